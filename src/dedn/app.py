"""A local web page for trying a trained model on your own pictures (``dedn app``).

Upload a support image and either paint the object on it or upload its mask, add one or more query
images, press *Segment*: the page shows each query with the predicted object overlaid and offers the
masks (PNG, 0/255) for download. It runs on your machine only (``127.0.0.1`` by default) and needs the
optional dependency gradio: ``pip install 'dedn[app]'``.

The work itself is in :func:`segment`, a plain function (tested without a browser); :func:`build_app`
only lays out the page around it.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dedn.errors import DataError, DednError
from dedn.predict import Predictor, load_image, output_names, save_png

__all__ = ["AppResult", "build_app", "editor_support", "launch_app", "segment"]

TITLE = "DEDN few-shot segmentation"


@dataclass
class AppResult:
    #: (overlay (H, W, 3) uint8, caption) per segmented query
    overlays: list[tuple[np.ndarray, str]] = field(default_factory=list)
    #: the written masks, one per segmented query
    mask_files: list[Path] = field(default_factory=list)
    #: queries that could not be read: (name, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    message: str = ""


def editor_support(value: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Split an image-editor value into (support image, painted 0/1 mask or None).

    The value is gradio's ``{"background", "layers", "composite"}`` dict of arrays (or a plain image): the
    background is the uploaded picture, and any non-transparent pixel of any layer is painted object.
    """
    if value is None:
        return None, None
    if not isinstance(value, dict):
        return np.asarray(value), None
    background = value.get("background")
    layers = [layer for layer in (value.get("layers") or []) if layer is not None]
    if background is None:
        return None, None
    background = np.asarray(background)
    painted = None
    for layer in layers:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[2] == 4:
            drawn = layer[:, :, 3] > 0
        elif layer.ndim == 3:
            drawn = layer.max(axis=2) > 0
        else:
            drawn = layer > 0
        if drawn.shape != background.shape[:2]:
            raise DataError(
                f"the painted layer is {drawn.shape[1]}x{drawn.shape[0]} but the support image is "
                f"{background.shape[1]}x{background.shape[0]}; paint on the uploaded image"
            )
        painted = drawn if painted is None else painted | drawn
    if painted is not None and not painted.any():
        painted = None
    return background, None if painted is None else painted.astype(np.uint8)


def segment(
    predictor: Predictor,
    support_image: Any,
    support_mask: Any,
    queries: Sequence[Any] | None,
    out_dir: str | os.PathLike,
    mask_value: int | None = None,
) -> AppResult:
    """Segment each query with one support; write ``<name>_mask.png`` files into ``out_dir``.

    ``support_image``: a path, an array, or an image-editor value (then paint on it gives the mask unless
    ``support_mask`` is given); ``support_mask``: a path / array or None; ``queries``: paths or arrays.
    Unreadable queries are listed in ``skipped`` and the others are still segmented.
    """
    from dedn.vis import overlay

    image, painted = support_image, None
    if isinstance(support_image, dict):
        image, painted = editor_support(support_image)
    if image is None or (isinstance(image, np.ndarray) and image.size == 0):
        raise DataError("upload a support image first")
    mask = support_mask if support_mask is not None else painted
    if mask is None:
        raise DataError("paint the object on the support image, or upload its mask")
    support_set = predictor.encode_supports([image], [mask], mask_value=mask_value)
    if support_set.empty:
        raise DataError("the support mask marks no object pixel: paint the object or check the mask")
    paths = [q for q in (queries or []) if q is not None]
    if not paths:
        raise DataError("upload at least one query image")
    files = [Path(q) for q in paths if isinstance(q, str | os.PathLike)]
    names = iter(output_names(files))
    out_dir = Path(out_dir)
    result = AppResult()
    for i, query in enumerate(paths):
        is_file = isinstance(query, str | os.PathLike)
        name = next(names) if is_file else f"query_{i + 1}"
        label = Path(query).name if is_file else name
        try:
            loaded = load_image(query, label)
        except DataError as e:
            result.skipped.append((label, str(e)))
            continue
        pred = predictor.predict_loaded(loaded, support_set, return_experts=True)
        result.mask_files.append(save_png(out_dir / f"{name}_mask.png", pred.mask * np.uint8(255)))
        caption = f"{label}: {100 * float(pred.mask.mean()):.1f}% object"
        if pred.fusion_weights:
            caption += " (" + ", ".join(f"{k} {v:.2f}" for k, v in pred.fusion_weights.items()) + ")"
        result.overlays.append((overlay(pred.image, pred.mask), caption))
    done = len(result.overlays)
    lines = [f"Segmented {done} image{'s' if done != 1 else ''}."]
    lines += [f"Skipped {name}: {reason}" for name, reason in result.skipped]
    result.message = "\n\n".join(lines)
    return result


def build_app(predictor: Predictor, description: str = ""):
    """The gradio page around :func:`segment` (``gradio.Blocks``; call ``.launch()`` on it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    lock = threading.Lock()  # one model, one episode at a time

    def run(editor_value, mask_file, query_files):
        out_dir = tempfile.mkdtemp(prefix="dedn-app-")
        try:
            with lock:
                result = segment(
                    predictor,
                    editor_value,
                    _file_path(mask_file),
                    [_file_path(f) for f in (query_files or [])],
                    out_dir,
                )
        except DednError as e:
            raise gr.Error(str(e)) from None
        return result.overlays, [str(p) for p in result.mask_files], result.message

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {TITLE}\n"
            "1. Upload a **support** image and paint over the object with the brush, *or* upload its mask "
            "(white or any single value on black, or a palette PNG).\n"
            "2. Upload one or more **query** images and press **Segment**: the object is found in each "
            "query; the masks can be downloaded below." + (f"\n\n{description}" if description else "")
        )
        with gr.Row():
            with gr.Column():
                support = gr.ImageEditor(
                    label="Support image (paint the object)",
                    type="numpy",
                    sources=["upload"],
                    elem_id="support",
                )
                mask = gr.File(
                    label="Support mask (optional, instead of painting)",
                    file_types=["image"],
                    elem_id="support-mask",
                )
            with gr.Column():
                queries = gr.File(
                    label="Query images", file_count="multiple", file_types=["image"], elem_id="queries"
                )
                button = gr.Button("Segment", variant="primary", elem_id="run")
                status = gr.Markdown(elem_id="status")
        gallery = gr.Gallery(
            label="Predictions",
            columns=3,
            height="auto",
            object_fit="contain",
            preview=False,
            elem_id="overlays",
            format="png",
        )
        masks = gr.File(
            label="Masks (PNG, 0 = background, 255 = object)", file_count="multiple", elem_id="masks"
        )
        button.click(run, [support, mask, queries], [gallery, masks, status], api_name="segment")
    return demo


def _file_path(value: Any) -> Any:
    """gradio hands files over as paths (or objects with ``.name`` in older versions)."""
    if value is None or isinstance(value, str | os.PathLike):
        return value
    return getattr(value, "name", None) or getattr(value, "path", None) or value


def launch_app(
    checkpoint: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    device: str | None = None,
    image_size: int | None = None,
    block: bool = True,
):
    """Load the checkpoint (default: the shipped model) and serve the page; returns the gradio app (already
    running if not ``block``)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise DednError("the web page needs gradio: pip install 'dedn[app]'") from None
    if checkpoint is None:
        predictor = Predictor.from_pretrained(device=device, image_size=image_size)
        name = f"the shipped model {predictor.pretrained}"
    else:
        predictor = Predictor.from_checkpoint(checkpoint, device=device, image_size=image_size)
        name = f"`{Path(checkpoint).name}`"
    cfg = predictor.config
    about = f"Model: {name} ({cfg.model.method}, {cfg.model.backbone}, input {predictor.image_size} px)."
    demo = build_app(predictor, about)
    demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        share=False,
        show_error=True,
        quiet=not block,
    )
    return demo
