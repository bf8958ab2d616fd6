"""Weak supports: a box or scribbles instead of a full mask.

Painting a mask takes a user a minute, drawing a box a second. PANet (Wang et al., ICCV 2019) scored
bounding-box and scribble supports within a few points of full masks; here both are offered to a user
(``dedn predict --support-box``, :meth:`Predictor.encode_supports`) and scored on the benchmarks
(``eval.support_annotation``), where they are made from each episode's support mask by a fixed, seeded
rule (:func:`box_from_mask`, :func:`scribbles_from_mask`), so that every method sees the same boxes and
scribbles.

A box is turned into the model's support mask by :func:`box_support` (``eval.box_refinement``): ``none``
takes the whole box as the object; ``probe`` keeps the part of the box that the support's own frozen
features separate from the picture outside the box (the `probe` matcher fitted with the box's inside as
object and its outside as background, twice, the second time with the first fit's background cells of
the box moved to the background), and marks the rest of the box "ignore" rather than background, since
a box's cells that look like the outside may still be object. With boxes DEDN averages its two experts
(:func:`equal_scores`): AWF's support scores would measure how well each member reproduces the box.
Scribbles are used as they are: their pixels are object or background, every other pixel "ignore", and
AWF scores the members on those pixels.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dedn.errors import DataError

IGNORE = 255
#: a refined box keeps at least this share of the box as object; below it, the refinement is not
#: trusted (a box around a thin or tiny object) and the whole box is the object
MIN_KEPT = 0.15


@dataclass(frozen=True)
class Box:
    """A support given as a box instead of a mask: pixels, x from the left and y from the top, x1 and y1
    exclusive (``Box(10, 20, 210, 180)`` is 200 pixels wide). Pass it where a support mask goes."""

    x0: float
    y0: float
    x1: float
    y1: float


def equal_scores(model, device=None) -> Tensor | None:
    """AWF's support scores for supports given as boxes (1, E): the trained experts equal, the
    training-free member (the probe, fitted to the support) out, so that the fusion is the experts' mean.
    AWF scores each member by how well it reproduces the support's mask on the support, and a box
    (refined or not) is not the object's mask: the member that reproduces the box best, the probe fitted
    to it, is not the one that finds the object. Base-class validation, fold 0, 300 episodes: AWF 50.2,
    all three members averaged 59.8, the two experts averaged 62.0 (full masks: 62.2). Scribbles are
    scored by AWF as masks are: their pixels are right, only sparse. None for a model without a fusion."""
    members = list(getattr(model, "fusion_members", []))
    experts = list(getattr(model, "expert_names", []))
    if getattr(model, "method", "") != "dedn" or len(members) < 2:
        return None
    # a score this low gives a weight of exactly 0 after softmax(score / temperature)
    return torch.tensor([[0.0 if m in experts else -1e4 for m in members]], device=device)


def box_from_mask(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The tight box (x0, y0, x1, y1), exclusive of x1 and y1, around the object pixels (== 1) of a
    {0, 1, 255} mask; None when it has none. Several objects of the class get one box around them all, as
    a user who marks "the dogs" with one box would."""
    ys, xs = np.nonzero(mask == 1)
    if len(ys) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def check_box(box: Box | Sequence[float], hw: tuple[int, int], name: str) -> tuple[int, int, int, int]:
    """A user's box (x0, y0, x1, y1 in pixels, x1 and y1 exclusive) checked against an image of size
    ``hw``; clipped to the image when it runs over by less than a pixel. Raises :class:`DataError` naming
    ``name`` and the problem."""
    box = astuple(box) if isinstance(box, Box) else tuple(box)
    if len(box) != 4:
        raise DataError(f"{name}: a box is 4 numbers, x0 y0 x1 y1; got {len(box)}")
    h, w = hw
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(np.isfinite([x0, y0, x1, y1])):
        raise DataError(f"{name}: the box {list(box)} has a value that is not a number")
    if x1 <= x0 or y1 <= y0:
        raise DataError(f"{name}: the box {x0:g} {y0:g} {x1:g} {y1:g} is empty: it needs x0 < x1 and y0 < y1")
    if x0 < -1 or y0 < -1 or x1 > w + 1 or y1 > h + 1:
        raise DataError(
            f"{name}: the box {x0:g} {y0:g} {x1:g} {y1:g} runs outside the {w}x{h} image "
            "(pixels, x from the left, y from the top)"
        )
    xi0, yi0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    xi1, yi1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
    if xi1 - xi0 < 2 or yi1 - yi0 < 2:
        raise DataError(f"{name}: the box {x0:g} {y0:g} {x1:g} {y1:g} is under 2 pixels wide or high")
    return xi0, yi0, xi1, yi1


def box_mask(hw: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """(H, W) uint8: 1 inside ``box`` (x0, y0, x1, y1, exclusive ends), 0 outside."""
    out = np.zeros(hw, np.uint8)
    x0, y0, x1, y1 = box
    out[y0:y1, x0:x1] = 1
    return out


def scribble_seed(image_id: str, class_id: int, seed: int) -> int:
    """A stable seed for the scribbles of one support (the same in every run and process)."""
    return zlib.crc32(f"{image_id}:{class_id}:{seed}".encode())


def scribbles_from_mask(mask: np.ndarray, seed: int, strokes: int = 1, points: int = 3) -> np.ndarray:
    """Scribbles made from a {0, 1, 255} mask by a seeded rule: ``strokes`` object strokes and as many
    background strokes, each a polyline through ``points`` points drawn at random from its region shrunk
    away from the border (by 5 % of the image's shorter side, less when the region is too thin), kept
    inside the region and drawn 1 % of the shorter side thick (at least 3 pixels). Returns (H, W) uint8:
    1 on object strokes, 0 on background strokes, 255 elsewhere. Deterministic for a seed."""
    from scipy.ndimage import binary_dilation, binary_erosion
    from skimage.draw import line
    from skimage.morphology import disk

    rng = np.random.default_rng(seed)
    h, w = mask.shape
    side = min(h, w)
    radius = max(1, round(0.005 * side))
    out = np.full((h, w), IGNORE, np.uint8)
    for value in (1, 0):
        region = mask == value
        if not region.any():
            continue
        inner = region
        for shrink in (round(0.05 * side), round(0.02 * side), 1):
            eroded = binary_erosion(region, disk(max(1, shrink)), border_value=1)
            if eroded.any():
                inner = eroded
                break
        ys, xs = np.nonzero(inner)
        drawn = np.zeros((h, w), bool)
        for _ in range(strokes):
            picks = rng.choice(len(ys), size=min(points, len(ys)), replace=False)
            pts = [(int(ys[i]), int(xs[i])) for i in picks]
            drawn[pts[0]] = True
            for (ya, xa), (yb, xb) in zip(pts[:-1], pts[1:], strict=True):
                rr, cc = line(ya, xa, yb, xb)
                drawn[rr, cc] = True
        drawn = binary_dilation(drawn & inner, disk(radius)) & region
        out[drawn] = value
    return out


def box_support(
    support_high: Tensor,
    box: Tensor,
    refinement: str,
    fit_probe,
    fractions,
    steps: int = 2,
) -> Tensor:
    """A box made into a support mask: ``box`` (S, S) {0, 1} in the network's padded square, the
    support's frozen high-level features ``support_high`` (C, h, w); -> (S, S) {0, 1, 255}.

    ``refinement``: ``none`` (the box is the object) | ``probe`` (see the module's docstring).
    ``fit_probe(high (1, 1, C, h, w), fg, bg) -> (w, b)`` fits the matcher and ``fractions(mask (1, 1, S,
    S), (h, w)) -> (fg, bg)`` gives each cell's shares (those of :class:`FewShotSegmenter`)."""
    box = box.long()
    if refinement == "none":
        return box
    if refinement != "probe":
        raise ValueError(f"unknown box refinement {refinement!r}")
    high = support_high.unsqueeze(0).unsqueeze(0)  # (1, 1, C, h, w)
    grid = support_high.shape[-2:]
    inside, outside = fractions(box.view(1, 1, *box.shape), grid)  # (1, 1, 1, h, w)
    fg, bg = inside, outside
    x = F.normalize(support_high, dim=0)
    for _ in range(steps):
        w, b = fit_probe(high, fg, bg)
        z = torch.einsum("chw,c->hw", x, w[0]) + b[0]
        # the box's cells that look like the outside join the background for the next fit
        object_like = (z > 0).to(inside.dtype).view_as(inside)
        fg, bg = inside * object_like, outside + inside * (1 - object_like)
    z = F.interpolate(z.view(1, 1, *grid), box.shape, mode="bilinear", align_corners=False)[0, 0]
    kept = (box == 1) & (z > 0)
    if kept.sum() < MIN_KEPT * (box == 1).sum():
        return box  # too little kept to trust (a thin or tiny object): the whole box
    out = torch.where(box == 1, torch.full_like(box, IGNORE), box)
    out[kept] = 1
    return out
