"""A local web page for trying a trained model on your own pictures (``dedn app``).

Upload one to five support images (*Add a support* / *Remove*) and, for each, paint the object on it or
upload its mask: the page shows each support as the model reads it, its object drawn over the picture,
so that a mask that does not line up is seen at once. Add one or more query images and press *Segment*:
each query is segmented with all the supports (K-shot), the page shows it with the predicted object
overlaid and offers the masks (PNG, 0/255) for download. A support may instead mark a rough region and
be ticked as *a box* (the box around it is the support, refined as ``dedn predict --support-box`` does);
supports may be given class names, and two or more names find those classes at once (one label map per
query). The method can be the trained model or a training-free matcher on its backbone. Without
``--checkpoint`` the shipped model is loaded (:meth:`Predictor.from_pretrained`); the page says which
model it runs. It runs on your machine
only (``127.0.0.1`` by default) and needs the optional dependency gradio: ``pip install 'dedn[app]'``.

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
from dedn.predict import Predictor, load_image, output_names, save_labels, save_png
from dedn.weak import Box, box_from_mask, box_mask

__all__ = [
    "MAX_SUPPORTS",
    "METHODS",
    "SLOT_INPUTS",
    "AppResult",
    "Slot",
    "build_app",
    "editor_support",
    "launch_app",
    "segment",
    "support_preview",
]

TITLE = "DEDN few-shot segmentation"
#: support slots on the page
MAX_SUPPORTS = 5


@dataclass
class AppResult:
    #: (overlay (H, W, 3) uint8, caption) per segmented query
    overlays: list[tuple[np.ndarray, str]] = field(default_factory=list)
    #: the written masks, one per segmented query
    mask_files: list[Path] = field(default_factory=list)
    #: queries that could not be read: (name, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    message: str = ""
    #: the number of supports used (K)
    shots: int = 0
    #: per query, what the fusion leaned on, in a user's words (the page shows them behind "Details")
    details: list[str] = field(default_factory=list)
    #: the classes looked for, in label order (one: "object" unless named)
    classes: list[str] = field(default_factory=list)


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


@dataclass
class Slot:
    """What one support slot of the page holds."""

    #: a path, an array, or the image editor's value (then the painting is the mask unless ``mask`` is set)
    image: Any = None
    #: a mask file / array, or None
    mask: Any = None
    #: the class this support shows (slots with the same name are K shots of one class; "" = "object")
    class_name: str = ""
    #: the painting (or mask) only marks where the object is: its bounding box is the support
    #: (a :class:`~dedn.weak.Box`, refined as ``dedn predict --support-box`` does)
    box: bool = False

    @classmethod
    def of(cls, value: Any) -> Slot:
        """A Slot from a Slot or a tuple (image, mask[, class name[, box]])."""
        return value if isinstance(value, Slot) else cls(*value)

    @property
    def label(self) -> str:
        return (self.class_name or "").strip() or "object"


def _slot_support(
    predictor: Predictor, slot: int, value: Any, mask: Any, mask_value: int | None, box: bool = False
) -> tuple[np.ndarray, np.ndarray | Box] | None:
    """One support slot (1-based ``slot``) -> (RGB image, {0, 1, 255} mask, or with ``box`` the
    :class:`~dedn.weak.Box` around what it marks), or None for an empty slot."""
    image, painted = value, None
    if isinstance(value, dict):
        try:
            image, painted = editor_support(value)
        except DataError as e:
            raise DataError(f"support {slot}: {e}") from None
    if image is None or (isinstance(image, np.ndarray) and image.size == 0):
        if mask is not None:
            raise DataError(f"support {slot}: upload the image that this mask belongs to")
        return None
    mask = mask if mask is not None else painted
    if mask is None:
        raise DataError(f"support {slot}: paint the object or upload its mask")
    try:
        loaded, binary = predictor.load_support(image, mask, mask_value, slot - 1)
    except DataError as e:
        message = str(e)
        prefix = "" if message.startswith(f"support {slot}") else f"support {slot}: "
        raise DataError(prefix + message) from None
    if not (binary == 1).any():
        raise DataError(f"support {slot}: the mask marks no object pixel; paint the object or check the mask")
    if box:
        return loaded.pixels, Box(*box_from_mask(binary))
    return loaded.pixels, binary


def support_preview(
    predictor: Predictor, slot: int, value: Any, mask: Any = None, box: bool = False
) -> tuple:
    """What support slot ``slot`` (1-based) holds, as the model will read it: (its image with the object
    drawn over it, a line in a user's words), so that a mask that does not line up with its picture (the
    wrong file, a shifted or inverted mask) is seen before segmenting. With ``box``, the box around what
    the slot marks. An empty slot gives (None, ""); a mistake gives (None, the message that Segment would
    give)."""
    from dedn.vis import SUPPORT_COLOR, overlay

    if mask is None and isinstance(value, dict) and value.get("background") is not None:
        try:
            if editor_support(value)[1] is None:  # a picture not painted yet: not a mistake
                return None, f"Support {slot}: paint the object or upload its mask"
        except DataError:
            pass  # _slot_support names the problem
    try:
        pair = _slot_support(predictor, slot, value, mask, None, box)
    except DataError as e:
        return None, f"**Support {slot} cannot be used:** {e}"
    if pair is None:
        return None, ""
    image, binary = pair
    if isinstance(binary, Box):
        x0, y0, x1, y1 = (int(v) for v in (binary.x0, binary.y0, binary.x1, binary.y1))
        return overlay(image, box_mask(image.shape[:2], (x0, y0, x1, y1)), SUPPORT_COLOR), (
            f"Support {slot}: a box from ({x0}, {y0}) to ({x1}, {y1}); the model takes the part of it that "
            "stands out from its surroundings"
        )
    share = 100 * float((binary == 1).mean())
    return overlay(
        image, binary, SUPPORT_COLOR
    ), f"Support {slot}: the object covers {share:.1f}% of the picture"


#: the page's choice of method -> ``dedn predict --method``
METHODS = {
    "The trained model": "model",
    "proto (training-free matching)": "proto",
    "prior (training-free, PFENet's prior)": "prior",
}


def segment(
    predictor: Predictor,
    supports: Sequence[Slot | tuple],
    queries: Sequence[Any] | None,
    out_dir: str | os.PathLike,
    mask_value: int | None = None,
    method: str = "model",
) -> AppResult:
    """Segment each query with all the given supports (K-shot); write ``<name>_mask.png`` into ``out_dir``.

    ``supports``: one :class:`Slot` (or tuple ``(image, mask[, class name[, box]])``) per slot, where
    ``image`` is a path, an array or an image-editor value (then the painting gives the mask unless
    ``mask`` is given) and ``mask`` a path / array or None. Slots without an image are skipped; errors
    name the slot (``support 2: ...``). Slots of two or more class names make several classes at once
    (:meth:`Predictor.predict_classes`): ``<name>_labels.png`` (value k = the k-th class, 0 background)
    instead of the mask. ``queries``: paths or arrays; unreadable ones are listed in ``skipped`` and the
    others still segmented. ``method``: model (``predictor``'s), proto or prior (training-free, on its
    backbone).
    """
    from dedn.vis import color_name, overlay, overlay_labels

    classes: dict[str, list] = {}
    for slot, item in enumerate(supports or [], start=1):
        item = Slot.of(item)
        pair = _slot_support(predictor, slot, item.image, item.mask, mask_value, item.box)
        if pair is not None:
            classes.setdefault(item.label, []).append(pair)
    if not classes:
        raise DataError("upload a support image first")
    paths = [q for q in (queries or []) if q is not None]
    if not paths:
        raise DataError("upload at least one query image")
    if method != "model":
        predictor = Predictor.training_free(method, predictor)
    # the slots are decoded and checked above: their {0, 1, 255} masks are read back unchanged
    sets = {
        name: predictor.encode_supports([p[0] for p in pairs], [p[1] for p in pairs])
        for name, pairs in classes.items()
    }
    files = [Path(q) for q in paths if isinstance(q, str | os.PathLike)]
    names = iter(output_names(files))
    out_dir = Path(out_dir)
    result = AppResult(shots=sum(s.shots for s in sets.values()), classes=list(sets))
    for i, query in enumerate(paths):
        is_file = isinstance(query, str | os.PathLike)
        name = next(names) if is_file else f"query_{i + 1}"
        label = Path(query).name if is_file else name
        try:
            loaded = load_image(query, label)
        except DataError as e:
            result.skipped.append((label, str(e)))
            continue
        if len(sets) > 1:
            found = predictor.predict_classes_loaded(loaded, sets)
            result.mask_files.append(save_labels(out_dir / f"{name}_labels.png", found.labels, len(sets)))
            result.overlays.append((overlay_labels(found.image, found.labels), classes_caption(label, found)))
            continue
        pred = predictor.predict_loaded(loaded, next(iter(sets.values())), return_experts=True)
        result.mask_files.append(save_png(out_dir / f"{name}_mask.png", pred.mask * np.uint8(255)))
        result.overlays.append((overlay(pred.image, pred.mask), caption_for(label, pred)))
        if pred.fusion_weights:
            result.details.append(f"{label}: {describe_weights(pred.fusion_weights)}")
    done, k = len(result.overlays), result.shots
    lines = [f"Segmented {done} image{'s' if done != 1 else ''} with {k} support{'s' if k != 1 else ''}."]
    if len(sets) > 1:
        legend = ", ".join(
            f"{n} {name} ({color_name(n)}, {sets[name].shots} support{'s' if sets[name].shots != 1 else ''})"
            for n, name in enumerate(sets, start=1)
        )
        lines[0] = lines[0][:-1] + f", {len(sets)} classes: {legend}."
    lines += [f"Skipped {name}: {reason}" for name, reason in result.skipped]
    result.message = "\n\n".join(lines)
    return result


def classes_caption(label: str, found) -> str:
    """A query's caption when several classes are looked for: each class's share of the picture."""
    from dedn.vis import color_name

    parts = []
    for k, name in enumerate(found.class_names, start=1):
        share = 100 * float((found.labels == k).mean())
        parts.append(f"{name} ({color_name(k)}) {share:.1f}%" if share > 0 else f"{name} not found")
    return f"{label}: " + ", ".join(parts)


def caption_for(label: str, pred) -> str:
    """A query's caption in a user's words: how much of the picture is marked, or that nothing was found
    (with the highest probability, so that a near miss can be told from a clear absence)."""
    if pred.empty_support:
        return f"{label}: nothing to look for (the supports mark no object)"
    if not pred.mask.any():
        top = float(pred.probability.max(initial=0.0))
        return f"{label}: not found (highest probability {top:.2f}); try another or a second support"
    return f"{label}: {100 * float(pred.mask.mean()):.1f}% of the picture marked"


#: what each fusion member is, for a user
_MEMBERS = {
    "object": "trained experts",
    "scenario": "trained experts",
    "probe": "matching fitted to your supports",
    "proto": "matching to your supports",
}


def describe_weights(weights: dict[str, float]) -> str:
    """AWF's weights in a user's words: the trained experts' share and the matcher's, in percent."""
    shares: dict[str, float] = {}
    for name, w in weights.items():
        key = _MEMBERS.get(name, name)
        shares[key] = shares.get(key, 0.0) + float(w)
    return ", ".join(f"{k} {100 * v:.0f} %" for k, v in shares.items())


def build_app(predictor: Predictor, description: str = ""):
    """The gradio page around :func:`segment` (``gradio.Blocks``; call ``.launch()`` on it)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    lock = threading.Lock()  # one model, one episode at a time

    def run(count, method, query_files, *slots):
        with lock:
            return page_run(predictor, count, query_files, *slots, method=METHODS.get(method, "model"))

    def show(old: int, new: int):
        """Updates from ``old`` to ``new`` visible slots: the count, the slot columns (only the one that
        appears or disappears changes), the two buttons. A hidden slot keeps what it holds (it comes back
        with it) but is not used."""
        columns = [
            gr.update(visible=i < new) if old != new and i == min(old, new) else gr.update()
            for i in range(MAX_SUPPORTS)
        ]
        buttons = [gr.update(interactive=new < MAX_SUPPORTS), gr.update(interactive=new > 1)]
        return [new, *columns, *buttons]

    def add(count):
        return show(int(count), min(int(count) + 1, MAX_SUPPORTS))

    def remove(count):
        return show(int(count), max(int(count) - 1, 1))

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {TITLE}\n"
            "1. Upload a **support** image and paint over the object with the brush, *or* upload its mask "
            "(white or any single value on black, or a palette PNG). **Add a support** for up to "
            f"{MAX_SUPPORTS} examples of the same object: each query is segmented with all of them.\n"
            "Instead of the exact outline, you may mark a rough region and tick **a box**: the box around "
            "what you marked is the support. To find **several classes** at once, name each support's "
            "class (supports with the same name are examples of one class).\n"
            "2. Upload one or more **query** images and press **Segment**: the object is found in each "
            "query; the masks can be downloaded below." + (f"\n\n{description}" if description else "")
        )
        count = gr.State(1)
        with gr.Row():
            with gr.Column():
                columns, editors, masks_in, previews, notes, names, boxes = [], [], [], [], [], [], []
                for i in range(1, MAX_SUPPORTS + 1):
                    with gr.Column(visible=i == 1, elem_id=f"support-slot-{i}") as column:
                        editors.append(
                            gr.ImageEditor(
                                label=f"Support {i} (paint the object)",
                                type="numpy",
                                sources=["upload"],
                                elem_id=f"support-{i}",
                            )
                        )
                        masks_in.append(
                            gr.File(
                                label=f"Support {i} mask (optional, instead of painting)",
                                file_types=["image"],
                                elem_id=f"support-mask-{i}",
                            )
                        )
                        with gr.Row():
                            names.append(
                                gr.Textbox(
                                    label="Class (optional)",
                                    placeholder="object",
                                    max_lines=1,
                                    elem_id=f"support-class-{i}",
                                )
                            )
                            boxes.append(
                                gr.Checkbox(
                                    label="A box: the box around what I marked",
                                    elem_id=f"support-box-{i}",
                                )
                            )
                        # the support as the model reads it: its object drawn over the picture
                        previews.append(
                            gr.Image(
                                label=f"Support {i} as read (object in blue)",
                                interactive=False,
                                format="png",
                                height=200,
                                elem_id=f"support-preview-{i}",
                            )
                        )
                        notes.append(gr.Markdown(elem_id=f"support-note-{i}"))
                    columns.append(column)
                with gr.Row():
                    add_button = gr.Button("Add a support", elem_id="add-support")
                    remove_button = gr.Button("Remove", interactive=False, elem_id="remove-support")
            with gr.Column():
                queries = gr.File(
                    label="Query images", file_count="multiple", file_types=["image"], elem_id="queries"
                )
                method = gr.Radio(
                    choices=list(METHODS), value=next(iter(METHODS)), label="Method", elem_id="method"
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
            label="Masks (PNG, 0 = background, 255 = object; with several classes, value k = class k)",
            file_count="multiple",
            elem_id="masks",
        )
        with gr.Accordion("Details: what each mask leaned on", open=False, elem_id="details-toggle"):
            details = gr.Markdown(elem_id="details")
        slot_outputs = [count, *columns, add_button, remove_button]
        # every click counts (a quick second click is not dropped while the first is finishing), one at a
        # time: the two buttons share one queue, so each reads the count the previous click left
        for button_, fn in [(add_button, add), (remove_button, remove)]:
            button_.click(
                fn,
                [count],
                slot_outputs,
                api_name=False,
                trigger_mode="multiple",
                show_progress="hidden",
                concurrency_limit=1,
                concurrency_id="support-slots",
            )
        for i, (editor, mask_in, box) in enumerate(zip(editors, masks_in, boxes, strict=True), start=1):
            for component in (editor, mask_in, box):
                component.change(
                    lambda value, mask, as_box, slot=i: support_preview(
                        predictor, slot, value, _file_path(mask), bool(as_box)
                    ),
                    [editor, mask_in, box],
                    [previews[i - 1], notes[i - 1]],
                    api_name=False,
                    show_progress="hidden",
                    trigger_mode="always_last",
                )
        slots = [c for group in zip(editors, masks_in, names, boxes, strict=True) for c in group]
        button.click(
            run, [count, method, queries, *slots], [gallery, masks, status, details], api_name="segment"
        )
    return demo


#: inputs per support slot on the page: image editor, mask file, class name, box checkbox
SLOT_INPUTS = 4


def page_run(predictor: Predictor, count: Any, query_files: Any, *slots: Any, method: str = "model") -> tuple:
    """What the page's Segment button does: the first ``count`` support slots (editor value, mask file,
    class name, box; :data:`SLOT_INPUTS` values each) and the query files -> (gallery, mask files, status,
    details). A user's mistake (no support, a mask of the wrong size...) comes back as the status line,
    with nothing else shown: no exception reaches the server, so its console prints no traceback for it."""
    count = max(1, min(int(count or 1), MAX_SUPPORTS))
    groups = [slots[i : i + SLOT_INPUTS] for i in range(0, len(slots), SLOT_INPUTS)]
    supports = [  # hidden slots ignored
        Slot(editor, _file_path(mask), name or "", bool(box)) for editor, mask, name, box in groups[:count]
    ]
    out_dir = tempfile.mkdtemp(prefix="dedn-app-")
    try:
        queries = [_file_path(f) for f in (query_files or [])]
        result = segment(predictor, supports, queries, out_dir, method=method)
    except DednError as e:
        return [], [], f"**Could not segment:** {e}", ""
    if len(result.classes) > 1:
        details = "(several classes: each is found as on its own, and a pixel goes to the likeliest)"
    elif method != "model":
        details = f"({method}: training-free, no fusion)"
    else:
        details = "\n".join(f"- {line}" for line in result.details) or "(one model: no fusion)"
    return result.overlays, [str(p) for p in result.mask_files], result.message, details


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
