"""Pictures of what a model does, drawn with Pillow alone (no plotting library).

* :func:`overlay` - a mask blended over an image, with its outline;
* :func:`episode_grid` - one row per episode: the supports with their masks, the query with its ground
  truth, each expert's prediction, the fused prediction (with IoU against the truth), and the fusion
  weights; :class:`EpisodeRecorder` collects the rows during ``dedn eval --save-vis N``;
* :func:`plot_training_curves` - the losses and the validation mIoU of a run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dedn.data.base import IGNORE_INDEX
from dedn.errors import DataError
from dedn.utils.io import atomic_write

__all__ = [
    "EpisodeRecorder",
    "GridRow",
    "episode_grid",
    "grid_size",
    "mask_iou",
    "overlay",
    "plot_training_curves",
    "read_metrics",
]

SUPPORT_COLOR = (40, 140, 255)
TRUTH_COLOR = (40, 200, 60)
PREDICTION_COLOR = (255, 50, 50)
#: one colour per curve, in order (loss/total first)
SERIES_COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]

#: grid layout, in pixels (see :func:`grid_size`)
GRID_PAD = 6
GRID_HEADER = 22
GRID_CAPTION = 18
_BACKGROUND = (250, 250, 250)
_TILE_BACKGROUND = (40, 40, 40)
_TEXT = (20, 20, 20)


def _font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


# ------------------------------------------------------------------------------------------------ overlays
def _boundary(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it, grown inwards to ``thickness`` pixels."""
    inner = mask.copy()
    for _ in range(thickness):
        eroded = inner.copy()
        eroded[1:, :] &= inner[:-1, :]
        eroded[:-1, :] &= inner[1:, :]
        eroded[:, 1:] &= inner[:, :-1]
        eroded[:, :-1] &= inner[:, 1:]
        inner = eroded
    return mask & ~inner


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    color: Sequence[int] = PREDICTION_COLOR,
    alpha: float = 0.45,
    outline: bool = True,
) -> np.ndarray:
    """Blend ``color`` over the pixels where ``mask == 1`` and draw their outline; 255 (ignore) is greyed.

    image: (H, W, 3) uint8; mask: (H, W) with 0/1 (and optionally 255). Returns (H, W, 3) uint8.
    """
    if image.shape[:2] != mask.shape[:2]:
        raise DataError(f"overlay: mask {mask.shape[:2]} and image {image.shape[:2]} differ in size")
    out = image.astype(np.float32)
    fg = mask == 1
    col = np.asarray(color, dtype=np.float32)
    out[fg] = out[fg] * (1.0 - alpha) + col * alpha
    ignore = mask == IGNORE_INDEX
    if ignore.any():
        out[ignore] = out[ignore] * 0.6 + 255.0 * 0.4
    if outline and fg.any():
        thickness = min(4, max(1, round(max(mask.shape) / 250)))
        out[_boundary(fg, thickness)] = col
    return np.round(out).astype(np.uint8)


def class_color(k: int) -> tuple[int, int, int]:
    """The colour of class ``k`` (1, 2, ...) in label-map overlays and palettes: the prediction red
    first, then the series colours."""
    colors = [PREDICTION_COLOR, *SERIES_COLORS[:3], *SERIES_COLORS[4:]]
    return tuple(colors[(k - 1) % len(colors)])


_COLOR_NAMES = ["red", "blue", "orange", "green", "purple", "brown", "pink", "grey", "olive", "cyan"]


def color_name(k: int) -> str:
    """The name of :func:`class_color` ``k``, for legends."""
    return _COLOR_NAMES[(k - 1) % len(_COLOR_NAMES)]


def overlay_labels(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """:func:`overlay` of each class of a label map ((H, W), 0 background, k = class k) in its colour."""
    out = image
    for k in (int(v) for v in np.unique(labels) if v != 0):
        out = overlay(out, (labels == k).astype(np.uint8), class_color(k), alpha)
    return out


def label_palette(n: int) -> list[int]:
    """A PNG palette (flat RGB list) for a label map of ``n`` classes: 0 black, k :func:`class_color`."""
    flat = [0, 0, 0]
    for k in range(1, n + 1):
        flat += list(class_color(k))
    return flat


def mask_iou(prediction: np.ndarray, truth: np.ndarray) -> float | None:
    """Foreground IoU of a 0/1 prediction against a {0, 1, 255} truth (255 left out); None if both empty."""
    valid = truth != IGNORE_INDEX
    p = (prediction == 1) & valid
    t = truth == 1
    union = int((p | t).sum())
    return None if union == 0 else float((p & t).sum()) / union


# ---------------------------------------------------------------------------------------------- the grid
@dataclass
class GridRow:
    """One episode of :func:`episode_grid` (arrays at any size; they are fitted into the tiles).

    ``predictions`` maps a column title (an expert's name, "fused") to a (H, W) 0/1 mask of the query.
    ``scores`` (same keys) overrides the IoU computed against ``truth`` (e.g. computed at full size).
    """

    supports: list[tuple[np.ndarray, np.ndarray]]
    query: np.ndarray
    predictions: dict[str, np.ndarray]
    truth: np.ndarray | None = None
    fusion_weights: dict[str, float] | None = None
    title: str = ""
    scores: dict[str, float | None] | None = None

    def titles(self) -> list[str]:
        k = len(self.supports)
        sup = ["support"] if k == 1 else [f"support {i + 1}" for i in range(k)]
        return sup + ["query + truth" if self.truth is not None else "query"] + list(self.predictions)


def grid_size(n_rows: int, n_cols: int, tile: int) -> tuple[int, int]:
    """(width, height) in pixels of an :func:`episode_grid` picture."""
    width = GRID_PAD + n_cols * (tile + GRID_PAD)
    height = GRID_HEADER + n_rows * (GRID_CAPTION + tile + GRID_PAD) + GRID_PAD
    return width, height


def _fit(image: np.ndarray, tile: int) -> Image.Image:
    """Fit an (H, W, 3) image into a tile x tile square (aspect kept, dark borders)."""
    im = Image.fromarray(image)
    scale = tile / max(im.width, im.height)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    im = im.resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (tile, tile), _TILE_BACKGROUND)
    canvas.paste(im, ((tile - size[0]) // 2, (tile - size[1]) // 2))
    return canvas


def _label(tile_image: Image.Image, text: str, font) -> None:
    draw = ImageDraw.Draw(tile_image, "RGBA")
    box = draw.textbbox((4, 3), text, font=font)
    draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0, 160))
    draw.text((4, 3), text, fill=(255, 255, 255), font=font)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def episode_grid(rows: Sequence[GridRow], path: str | os.PathLike, tile: int = 160) -> Path:
    """Write a PNG with one row per episode (layout in :func:`grid_size`); returns the path.

    Columns: each support with its mask (blue), the query with the ground truth (green), then each entry
    of ``predictions`` (red) labelled with its IoU against the truth; the row caption gives the episode
    title and the fusion weights.
    """
    if not rows:
        raise DataError("episode_grid: no episodes to draw")
    n_cols = max(len(r.titles()) for r in rows)
    width, height = grid_size(len(rows), n_cols, tile)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font, small = _font(13), _font(12)
    header = max(rows, key=lambda r: len(r.titles())).titles()
    for c, title in enumerate(header):
        x = GRID_PAD + c * (tile + GRID_PAD)
        draw.text((x + 2, 4), title, fill=_TEXT, font=font)
    for r, row in enumerate(rows):
        y = GRID_HEADER + r * (GRID_CAPTION + tile + GRID_PAD)
        caption = row.title
        if row.fusion_weights:
            weights = ", ".join(f"{k} {v:.2f}" for k, v in row.fusion_weights.items())
            caption = f"{caption}   fusion weights: {weights}" if caption else f"fusion weights: {weights}"
        draw.text((GRID_PAD + 2, y + 2), caption, fill=_TEXT, font=small)
        cells: list[tuple[np.ndarray, str]] = [
            (overlay(img, msk, SUPPORT_COLOR), "") for img, msk in row.supports
        ]
        if row.truth is not None:
            cells.append((overlay(row.query, row.truth, TRUTH_COLOR), ""))
        else:
            cells.append((row.query, ""))
        for name, pred in row.predictions.items():
            score = (
                row.scores.get(name)
                if row.scores is not None and name in row.scores
                else (mask_iou(pred, row.truth) if row.truth is not None else None)
            )
            text = f"IoU {_pct(score)}" if (row.truth is not None or row.scores) else ""
            cells.append((overlay(row.query, pred, PREDICTION_COLOR), text))
        for c, (pixels, text) in enumerate(cells):
            im = _fit(pixels, tile)
            if text:
                _label(im, text, small)
            canvas.paste(im, (GRID_PAD + c * (tile + GRID_PAD), y + GRID_CAPTION))
    return _save(canvas, path)


def _save(image: Image.Image, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def _thumbnail(array: np.ndarray, longest: int, nearest: bool) -> np.ndarray:
    h, w = array.shape[:2]
    scale = longest / max(h, w)
    if scale >= 1:
        return array
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize(size, resample))


class EpisodeRecorder:
    """An ``on_episode(seed, i, EpisodeResult)`` hook for :func:`dedn.engine.evaluate.run_evaluation`
    that keeps the first ``n`` episodes of ``seed`` as :class:`GridRow` (images shrunk to the tile size,
    IoU computed at the original size); :meth:`write` draws them with :func:`episode_grid`.
    """

    def __init__(self, source, image_size: int, n: int, seed: int, tile: int = 160):
        from dedn.data.index import ignore_value
        from dedn.data.transforms import TestTransform

        self.source = source
        self.transform = TestTransform(image_size)
        self.n = n
        self.seed = seed
        self.tile = tile
        self.ignore = ignore_value(source)
        self.rows: list[GridRow] = []

    def __call__(self, seed: int, index: int, result) -> None:
        if seed != self.seed or len(self.rows) >= self.n:
            return
        self.rows.append(self.make_row(index, result))

    def make_row(self, index: int, result) -> GridRow:
        from dedn.data.episodes import binarize
        from dedn.data.transforms import restore_logits

        ep = result.episode
        query = self.source.load_image(ep.query)
        truth = binarize(self.source.load_label(ep.query), ep.class_id, self.ignore)
        hw = truth.shape[:2]
        scaled = self.transform.scaled_hw(hw)
        predictions: dict[str, np.ndarray] = {}
        experts = result.outputs.get("experts", {}) if isinstance(result.outputs, dict) else {}
        # the training-free member of AWF (model.fusion.matcher) is drawn after the experts
        matcher = result.outputs.get("matcher", {}) if isinstance(result.outputs, dict) else {}
        for name, logits in {**experts, **matcher}.items():
            restored = restore_logits(logits[:1].detach().float().cpu(), scaled, hw)
            predictions[name] = restored.argmax(dim=1)[0].numpy().astype(np.uint8)
        predictions["fused" if experts else "prediction"] = (
            result.prediction.detach().cpu().numpy().astype(np.uint8)
        )
        scores = {k: mask_iou(v, truth) for k, v in predictions.items()}
        weights = None
        if "fusion_weights" in result.outputs and experts:
            w = result.outputs["fusion_weights"][0].detach().float().cpu().tolist()
            weights = dict(zip([*experts, *matcher], w, strict=True))
        supports = []
        for sid in ep.supports:
            label = binarize(self.source.load_label(sid), ep.class_id, self.ignore)
            supports.append(
                (
                    _thumbnail(self.source.load_image(sid), self.tile, False),
                    _thumbnail(label, self.tile, True),
                )
            )
        names = getattr(self.source, "class_names", [])
        cname = names[ep.class_id - 1] if 0 < ep.class_id <= len(names) else str(ep.class_id)
        return GridRow(
            supports=supports,
            query=_thumbnail(query, self.tile, False),
            truth=_thumbnail(truth, self.tile, True),
            predictions={k: _thumbnail(v, self.tile, True) for k, v in predictions.items()},
            fusion_weights=weights,
            title=f"#{index} {cname} ({ep.query})",
            scores=scores,
        )

    def write(self, path: str | os.PathLike) -> Path | None:
        """Draw the recorded episodes; None when there were none (e.g. on a non-main process)."""
        if not self.rows:
            return None
        return episode_grid(self.rows, path, self.tile)


# ------------------------------------------------------------------------------------------------ curves
@dataclass
class _Series:
    points: dict[int, float] = field(default_factory=dict)

    def add(self, step: int, value: float) -> None:
        # A resumed run logs again from its checkpoint's step: the newer records replace the older ones.
        stale = [s for s in self.points if s >= step]
        for s in stale:
            del self.points[s]
        self.points[step] = value

    def xy(self) -> tuple[list[int], list[float]]:
        steps = sorted(self.points)
        return steps, [self.points[s] for s in steps]


def read_metrics(path: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """Numeric series of a trainer's ``metrics.jsonl``: {key: (steps, values)}, resumed runs merged.

    Lines that are not JSON objects with an integer ``step`` (a line cut short by a crash) are skipped;
    non-finite values are left out.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"metrics file {path} does not exist") from None
    except OSError as e:
        raise DataError(f"cannot read metrics file {path}: {e}") from None
    series: dict[str, _Series] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        step = record["step"]
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                series.setdefault(key, _Series()).add(step, float(value))
    return {k: s.xy() for k, s in series.items()}


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t < hi + step * 0.5:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 10000:
        return f"{v / 1000:g}k"
    return f"{v:.4g}"


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    ylabel: str,
    curves: list[tuple[str, list[int], list[float], tuple[int, int, int], int]],
    x_range: tuple[float, float],
    font,
    small,
) -> None:
    """One chart in ``box`` (left, top, right, bottom): axes, ticks, grid, curves and a legend."""
    left, top, right, bottom = box
    draw.text((left, top - 22), title, fill=_TEXT, font=font)
    if not curves:
        draw.rectangle(box, outline=(160, 160, 160))
        draw.text(
            (left + 12, (top + bottom) // 2 - 8), f"no {ylabel} records", fill=(120, 120, 120), font=font
        )
        return
    ys = [v for _, _, vals, _, _ in curves for v in vals]
    yticks = _nice_ticks(min(ys), max(ys))
    y0, y1 = yticks[0], yticks[-1]
    xticks = _nice_ticks(*x_range, count=6)
    xticks = [t for t in xticks if x_range[0] <= t <= x_range[1]] or [x_range[0], x_range[1]]
    x0, x1 = x_range if x_range[1] > x_range[0] else (x_range[0] - 1, x_range[0] + 1)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    for t in yticks:
        y = py(t)
        draw.line((left, y, right, y), fill=(225, 225, 225))
        label = _tick_label(t)
        w = draw.textlength(label, font=small)
        draw.line((left - 4, y, left, y), fill=_TEXT)
        draw.text((left - 7 - w, y - 7), label, fill=_TEXT, font=small)
    for t in xticks:
        x = px(t)
        draw.line((x, bottom, x, bottom + 4), fill=_TEXT)
        label = _tick_label(t)
        w = draw.textlength(label, font=small)
        draw.text((x - w / 2, bottom + 6), label, fill=_TEXT, font=small)
    draw.rectangle(box, outline=(90, 90, 90))
    draw.text(((left + right) // 2 - 12, bottom + 22), "step", fill=_TEXT, font=small)
    for _, steps, vals, color, width in curves:
        points = [(px(s), py(v)) for s, v in zip(steps, vals, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=color, width=width, joint="curve")
        if len(points) <= 30:  # sparse series (validation): mark the measured points
            for x, y in points:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
    # legend, top right inside the plot
    entries = [(name, color) for name, _, _, color, _ in curves]
    text_w = max(draw.textlength(name, font=small) for name, _ in entries)
    lw, lh = int(text_w) + 34, 16 * len(entries) + 8
    lx, ly = right - lw - 8, top + 8
    draw.rectangle((lx, ly, lx + lw, ly + lh), fill=(255, 255, 255), outline=(160, 160, 160))
    for i, (name, color) in enumerate(entries):
        yy = ly + 6 + 16 * i
        draw.line((lx + 6, yy + 7, lx + 22, yy + 7), fill=color, width=3)
        draw.text((lx + 27, yy), name, fill=_TEXT, font=small)


def plot_training_curves(
    metrics_jsonl_path: str | os.PathLike,
    png_path: str | os.PathLike,
    width: int = 900,
    panel_height: int = 300,
) -> Path:
    """Draw the training losses (``loss/total`` and every other ``loss/*``) and the validation mIoU
    (``val/miou``, in %) against the step, as two stacked charts in one PNG. Returns the PNG's path."""
    series = read_metrics(metrics_jsonl_path)
    loss_keys = sorted(k for k in series if k.startswith("loss/"))
    if "loss/total" in loss_keys:
        loss_keys.remove("loss/total")
        loss_keys.insert(0, "loss/total")
    all_steps = [s for k in loss_keys + ["val/miou"] if k in series for s in series[k][0]]
    x_range = (0.0, float(max(all_steps))) if all_steps else (0.0, 1.0)
    loss_curves = [
        (key, *series[key], SERIES_COLORS[i % len(SERIES_COLORS)], 3 if key == "loss/total" else 2)
        for i, key in enumerate(loss_keys)
    ]
    val_curves = []
    if "val/miou" in series:
        steps, values = series["val/miou"]
        val_curves.append(("val/miou (%)", steps, [100 * v for v in values], SERIES_COLORS[2], 2))
    margin_l, margin_r, margin_t, margin_b = 70, 20, 34, 44
    height = 2 * panel_height
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(12)
    for i, (title, label, curves) in enumerate(
        (
            ("training loss", "loss", loss_curves),
            ("validation mIoU (%)", "val/miou", val_curves),
        )
    ):
        top = i * panel_height + margin_t
        box = (margin_l, top, width - margin_r, (i + 1) * panel_height - margin_b)
        _panel(draw, box, title, label, curves, x_range, font, small)
    return _save(canvas, png_path)
