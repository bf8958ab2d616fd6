"""Shared helpers for the tests of the "using it" modules (predict, vis, export, app).

A tiny trained-looking checkpoint: the toy backbone with freshly initialised heads, saved exactly as the
trainer saves one. Its predictions are meaningless, but every code path between files and the network is
the real one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dedn.config import Config, ModelConfig, to_dict
from dedn.engine.checkpoint import save_checkpoint, trainable_state
from dedn.models.network import FewShotSegmenter

TOY_SIZE = 64


def toy_config(image_size: int = TOY_SIZE, **model) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(backbone="toy", weights=None, channels=16, **model)
    cfg.data.image_size = image_size
    return cfg


def make_checkpoint(path: Path, cfg: Config | None = None, seed: int = 0, balanced: bool = False) -> Path:
    """Save a checkpoint of ``cfg`` (default: the toy DEDN) with heads initialised from ``seed``.

    Untrained heads call almost every pixel foreground. ``balanced`` shifts each expert's output bias so
    that about half of the pixels of a :func:`scene` query come out as object: the masks then depend on
    the picture's content, which lets tests compare masks produced along different paths.
    """
    cfg = cfg or toy_config()
    torch.manual_seed(seed)
    model = FewShotSegmenter(cfg.model).eval()
    if balanced:
        from dedn.data.transforms import TestTransform

        t = TestTransform(cfg.data.image_size)
        support, mask = scene(seed=1)
        query, _ = scene(seed=2)
        q, _, _ = t(query, None)
        s, m, _ = t(support, mask)
        with torch.no_grad():
            out = model(q[None], s[None, None], m[None, None])
            for name, logits in out["experts"].items():
                margin = (logits[0, 1] - logits[0, 0]).median()
                model.experts[name].classifier[-1].bias[1] -= margin
    save_checkpoint(path, {"model": trainable_state(model), "config": to_dict(cfg), "step": 0})
    return path


def scene(h: int = 48, w: int = 64, box: tuple[int, int, int, int] = (10, 12, 30, 40), seed: int = 0):
    """A noisy RGB picture with a bright square, and its 0/1 mask: (H, W, 3) uint8, (H, W) uint8."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
    y0, x0, y1, x1 = box
    image[y0:y1, x0:x1] = (220, 180, 40)
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return image, mask


def save_rgb(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def episode_files(folder: Path):
    """A support picture, its 0/255 mask and a query written as s.png, m.png, q.png in ``folder``;
    returns the three paths and the arrays (support, 0/1 mask, query)."""
    support, mask = scene(seed=0)
    query, _ = scene(seed=1)
    paths = (save_rgb(folder / "s.png", support), save_rgb(folder / "m.png", mask * 255),
             save_rgb(folder / "q.png", query))  # fmt: skip
    return paths, (support, mask, query)


def assert_onnx_matches(model: FewShotSegmenter, path: Path, shots: int, size: int, seed: int = 5) -> None:
    """Export ``model`` to ONNX at ``shots`` and ``size``, and check that onnxruntime gives its output on an
    episode other than the exporter's own check (to 1e-4)."""
    from dedn.export import EpisodeGraph, export_onnx, run_onnx

    report = export_onnx(model, path, shots=shots, image_size=size)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    g = torch.Generator().manual_seed(seed)
    query = torch.rand(1, 3, size, size, generator=g)
    supports = torch.rand(1, shots, 3, size, size, generator=g)
    masks = torch.zeros(1, shots, size, size)
    masks[..., size // 4 : size // 2, size // 4 : 3 * size // 4] = 1
    with torch.no_grad():
        expected = EpisodeGraph(model)(query, supports, masks)
    got = run_onnx(report.path, query, supports, masks)
    assert float((got - expected).abs().max()) < 1e-4


def train_and_evaluate(folder: Path, settings: list[str]) -> tuple[list[dict], Path, dict]:
    """``dedn train`` into ``folder``, then ``dedn eval`` of its best checkpoint into ``folder / "eval"``,
    both from the command line with ``settings`` (``--set`` values). Returns the training's metrics
    records, the checkpoint and the evaluation's results.json."""
    import json

    from dedn.cli import main

    sets = [a for s in settings for a in ("--set", s)]
    assert main(["train", "--quiet", "--output", str(folder), *sets]) == 0
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    ckpt = folder / "checkpoints" / "best.pt"
    out = folder / "eval"
    assert main(["eval", "--quiet", "--output", str(out), "--checkpoint", str(ckpt), *sets]) == 0
    return records, ckpt, json.loads((out / "results.json").read_text())
