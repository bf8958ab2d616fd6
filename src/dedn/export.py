"""Export a trained model's episode forward pass to ONNX (``dedn export``).

The exported graph takes one episode at a fixed size ``S`` and shot count ``K``:

* ``query`` (1, 3, S, S) float32 RGB in [0, 1];
* ``supports`` (1, K, 3, S, S) float32 RGB in [0, 1];
* ``support_masks`` (1, K, S, S) float32 with 1 = object, 0 = background, 255 = ignore (padding);

and returns ``foreground`` (1, 1, S, S), the fused foreground probability. Pictures must be prepared as
:class:`dedn.data.transforms.TestTransform` does (longer side resized to ``S``, padded bottom/right with
:data:`~dedn.data.transforms.PAD_RGB` and masks with 255), and the output cropped to the content and resized
back; the backbone's own normalisation is inside the graph. The settings are stored in the model's
metadata (``image_size``, ``shots``, ``pad_rgb``...).

Two things in the PyTorch model do not trace to ONNX as they are, and are handled here without touching
the model code:

* ``dedn.models.ops.mask_fractions`` pools the masks to the feature grid with ``adaptive_avg_pool2d``,
  whose output size the TorchScript exporter only accepts as a constant; during export it is replaced by
  the same area average written as two constant matrix products (exact for any sizes, divisible or not);
* an episode whose supports have no object pixel is a Python ``if`` in ``forward_features``; the graph is
  traced on such an episode so that the ``torch.where`` that handles it is recorded (for other episodes it
  selects the network's output).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from dedn.data.transforms import PAD_RGB
from dedn.errors import ConfigError, DednError
from dedn.models.ops import pooling_matrix
from dedn.utils.io import make_dir

__all__ = ["EpisodeGraph", "ExportReport", "export_onnx", "pooling_matrix", "run_onnx"]

#: ONNX opset of the exported graphs (onnxruntime >= 1.12 runs it)
DEFAULT_OPSET = 17


class EpisodeGraph(nn.Module):
    """The episode forward pass as exported: images and masks in, foreground probability out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, query: Tensor, supports: Tensor, support_masks: Tensor) -> Tensor:
        out = self.model(query, supports, support_masks)
        # DEDN's logits are the log of the fused probability, so the softmax gives that probability back
        return out["logits"].softmax(dim=1)[:, 1:2]


@contextlib.contextmanager
def _static_mask_pooling(image_size: int, grid: tuple[int, int]) -> Iterator[None]:
    """Swap ``mask_fractions`` in the network module for a constant-matrix version while exporting."""
    import dedn.models.network as network

    rows = pooling_matrix(image_size, grid[0])
    cols = pooling_matrix(image_size, grid[1]).t().contiguous()

    def mask_fractions(masks: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        fg = (masks == 1).float().unsqueeze(1)
        bg = (masks == 0).float().unsqueeze(1)
        return rows @ fg @ cols, rows @ bg @ cols

    original = network.mask_fractions
    network.mask_fractions = mask_fractions
    try:
        yield
    finally:
        network.mask_fractions = original


@dataclass
class ExportReport:
    path: Path
    image_size: int
    shots: int
    seconds: float
    #: largest |probability difference| between onnxruntime and PyTorch on the check episodes, or None
    max_abs_diff: float | None = None


def _example(image_size: int, shots: int, seed: int, empty: bool) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = image_size
    query = torch.rand(1, 3, s, s, generator=g)
    supports = torch.rand(1, shots, 3, s, s, generator=g)
    masks = torch.zeros(1, shots, s, s)
    if not empty:
        masks[:, :, s // 4 : 3 * s // 4, s // 5 : 3 * s // 5] = 1.0
        masks[:, :, -s // 8 :, :] = 255.0  # padding, as TestTransform leaves it
    return query, supports, masks


def run_onnx(path: str | os.PathLike, query: Tensor, supports: Tensor, support_masks: Tensor) -> Tensor:
    """Run an exported model in onnxruntime (CPU) -> foreground (1, 1, S, S)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise DednError("onnxruntime is not installed: pip install 'dedn[export]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {
        "query": query.numpy(),
        "supports": supports.numpy(),
        "support_masks": support_masks.float().numpy(),
    }
    return torch.from_numpy(session.run(["foreground"], feeds)[0])


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    shots: int,
    image_size: int,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    metadata: dict[str, str] | None = None,
) -> ExportReport:
    """Export ``model`` (a :class:`~dedn.models.network.FewShotSegmenter`) for K = ``shots`` at size S.

    With ``verify``, the file is run in onnxruntime on a few episodes (with and without an object in the
    supports) and compared with PyTorch; the largest difference is returned in the report.
    """
    if not isinstance(shots, int) or shots < 1:
        raise ConfigError(f"shots must be a positive integer, got {shots!r}")
    if not isinstance(image_size, int) or image_size < 32:
        raise ConfigError(f"image size must be an integer of at least 32, got {image_size!r}")
    fusion = getattr(getattr(model, "cfg", None), "fusion", None)
    if getattr(model, "method", "") == "dedn" and getattr(fusion, "matcher", "") == "probe":
        raise ConfigError(
            "model.fusion.matcher = probe fits a classifier to each support set with an iterative solver, "
            "which a static ONNX graph cannot hold; export with the proto matcher (dedn export --matcher "
            "proto) or without one (--matcher none)"
        )
    path = Path(path)
    make_dir(path.parent, "folder of --out")
    model = model.to("cpu").eval()
    graph = EpisodeGraph(model).eval()
    with torch.no_grad():
        grid = tuple(model.encode(torch.zeros(1, 3, image_size, image_size))["mid"].shape[-2:])
    start = time.perf_counter()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with torch.no_grad(), _static_mask_pooling(image_size, grid), warnings.catch_warnings():
            # the tracer warns about every Python int taken from a tensor shape; the shapes are fixed here
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            torch.onnx.export(
                graph,
                _example(image_size, shots, seed=0, empty=True),
                str(tmp),
                dynamo=False,  # the TorchScript exporter: needs no onnxscript, and handles this model as is
                input_names=["query", "supports", "support_masks"],
                output_names=["foreground"],
                opset_version=opset,
                do_constant_folding=True,
            )
        _add_metadata(
            tmp,
            {
                "image_size": str(image_size),
                "shots": str(shots),
                "pad_rgb": ",".join(f"{v:g}" for v in PAD_RGB),
                "inputs": "query (1,3,S,S) RGB [0,1]; supports (1,K,3,S,S); support_masks (1,K,S,S) float "
                "1 object / 0 background / 255 ignore",
                "output": "foreground (1,1,S,S) probability",
                "preprocess": "resize the longer side to S keeping the aspect ratio, pad bottom/right "
                "(images with pad_rgb, masks with 255)",
                **(metadata or {}),
            },
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left behind only when the export failed
    report = ExportReport(path, image_size, shots, time.perf_counter() - start)
    if verify:
        diffs = []
        for seed, empty in ((1, False), (2, False), (3, True)):
            example = _example(image_size, shots, seed, empty)
            with torch.no_grad():
                expected = graph(*example)
            diffs.append(float((run_onnx(path, *example) - expected).abs().max()))
        report.max_abs_diff = max(diffs)
    return report


def _add_metadata(path: Path, entries: dict[str, str]) -> None:
    try:
        import onnx
    except ImportError:  # the metadata is a convenience; the model works without it
        return
    model = onnx.load(str(path))
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    model.doc_string = "dedn few-shot segmentation episode: " + entries.get("output", "")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
