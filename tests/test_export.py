"""ONNX export: the graph run in onnxruntime gives PyTorch's probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dedn.cli import main
from dedn.config import ModelConfig
from dedn.data.transforms import TestTransform
from dedn.errors import ConfigError
from dedn.models.network import FewShotSegmenter
from usage_helpers import make_checkpoint, scene

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'dedn[export]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'dedn[export]')")

from dedn.export import EpisodeGraph, export_onnx, pooling_matrix, run_onnx  # noqa: E402

TOLERANCE = 1e-4


def _episode(size: int, shots: int):
    """A real-looking episode prepared as in evaluation (resize + pad), pictures of different sizes."""
    t = TestTransform(size)
    query, _ = scene(50, 70, (10, 20, 40, 50), seed=7)
    q, _, _ = t(query, None)
    images, masks = [], []
    for i in range(shots):
        image, mask = scene(60 + 10 * i, 45, (10, 5, 40, 35), seed=i)
        s, m, _ = t(image, mask)
        images.append(s)
        masks.append(m)
    return q[None], torch.stack(images)[None], torch.stack(masks)[None].float()


def test_pooling_matrix_is_adaptive_average_pooling():
    x = torch.rand(2, 1, 37, 50)
    for out in [(5, 7), (37, 25), (4, 4)]:
        pooled = pooling_matrix(37, out[0]) @ x @ pooling_matrix(50, out[1]).t()
        torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(x, out), atol=1e-6, rtol=0)


def _check(model, tmp_path, shots: int, size: int):
    path = tmp_path / f"model-{shots}.onnx"
    report = export_onnx(model, path, shots=shots, image_size=size)
    assert report.max_abs_diff is not None and report.max_abs_diff < TOLERANCE
    graph = EpisodeGraph(model).eval()
    for masks_of in (lambda m: m, torch.zeros_like):  # the episode, then the same with empty supports
        query, supports, masks = _episode(size, shots)
        masks = masks_of(masks)
        with torch.no_grad():
            expected = graph(query, supports, masks)
        got = run_onnx(path, query, supports, masks)
        assert got.shape == (1, 1, size, size)
        assert float((got - expected).abs().max()) < TOLERANCE
    # with empty supports the model answers "background everywhere", and so must the graph
    assert float(got.max()) < 1e-6
    return path


@pytest.mark.parametrize("shots", [1, 2])
def test_toy_model_matches_onnxruntime(tmp_path, shots):
    torch.manual_seed(0)
    model = FewShotSegmenter(ModelConfig(backbone="toy", weights=None, channels=16)).eval()
    path = _check(model, tmp_path, shots, 64)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["shots"] == str(shots) and meta["image_size"] == "64"


@pytest.mark.slow
@pytest.mark.parametrize("shots,size", [(1, 96), (2, 100)])  # 100 px: feature grid not a divisor
def test_efficientnet_lite0_matches_onnxruntime(tmp_path, shots, size):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="efficientnet_lite0", weights="imagenet", channels=32)
    model = FewShotSegmenter(cfg).eval()
    _check(model, tmp_path, shots, size)


def test_export_leaves_the_model_unchanged(tmp_path):
    import dedn.models.network as network

    before = network.mask_fractions
    model = FewShotSegmenter(ModelConfig(backbone="toy", weights=None, channels=16)).eval()
    export_onnx(model, tmp_path / "m.onnx", shots=1, image_size=64, verify=False)
    assert network.mask_fractions is before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left
    with pytest.raises(ConfigError):
        export_onnx(model, tmp_path / "m.onnx", shots=0, image_size=64)


def test_cli_export(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "toy.pt")
    out = tmp_path / "exported" / "model.onnx"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(ckpt),
                "--format",
                "onnx",
                "--shots",
                "2",
                "--out",
                str(out),
                "--size",
                "64",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "2-shot" in text and "checked with onnxruntime" in text
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["method"] == "dedn" and meta["backbone"] == "toy" and meta["checkpoint"] == "toy.pt"
    graph = onnx.load(str(out)).graph
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert inputs == {"query": [1, 3, 64, 64], "supports": [1, 2, 3, 64, 64], "support_masks": [1, 2, 64, 64]}
    assert np.isfinite(run_onnx(out, *_episode(64, 2)).numpy()).all()


def test_a_probe_matcher_is_refused_with_the_way_out(tmp_path, capsys):
    """A checkpoint whose fusion uses the probe (fitted per support set) is not exported silently wrong:
    a clear error names --matcher; with --matcher proto the graph is the proto fusion's."""
    from usage_helpers import toy_config

    cfg = toy_config()
    cfg.model.fusion.matcher = "probe"
    ckpt = make_checkpoint(tmp_path / "probe.pt", cfg)
    out = tmp_path / "model.onnx"
    args = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--size", "64"]
    assert main(args) == 2
    assert "--matcher proto" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--matcher", "proto"]) == 0
    assert "checked with onnxruntime" in capsys.readouterr().out
