"""Pseudo-classes drawn from the background of the training images, for training episodes whose target is
not a benchmark object.

Why: PASCAL-5i labels sky, road, water, grass, walls and trees as background. Trained only on its object
classes, both experts learn that "the target is a PASCAL-like object" and collapse on a novel class that
is stuff (CamVid's sky, road, building; docs/results.md, cross-domain). Self-supervised few-shot work
(SSL-ALPNet, Ouyang et al., ECCV 2020, with superpixels as pseudo-labels) trains on pseudo-classes that
come from the images themselves. Here a pseudo-class
is a cluster of the frozen high-level backbone features of *background* cells, found by spherical
k-means over every training image: the clusters of ImageNet features are largely semantic (sky, grass,
water, wall, floor), so a cluster recurs across images and forms few-shot episodes like a labelled class.

Clusters that are positions rather than content are dropped: convolutional features at the image's edge
carry the padding, and k-means finds them as clusters of their own (on offline PASCAL fold 0 with 24
clusters, three lay 93-98 % within one feature cell of the border, in 470-770 of the ~900 images). A
cluster with most of its pixels in that band is not a pseudo-class; its pixels stay background.

How: each training image's background pixels (label 0) are given the pseudo-class whose centre is most
similar to the bilinearly upsampled feature there; object and ignore pixels keep their labels. The
pseudo-class ids follow the benchmark's classes (``num_classes + 1 ..``), so every episode routine works
on them unchanged. Nothing here sees a test image or a novel class: the clusters are fitted on the
training images' background only (under the disjoint protocol those contain no novel pixel at all).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from dedn.errors import DataError


def background_cells(high: Tensor, label: Tensor, min_fraction: float = 0.75, value: int = 0) -> Tensor:
    """The L2-normalised feature vectors (n, C) of the grid cells of ``high`` (C, h, w) whose area in
    ``label`` (S, S) is at least ``min_fraction`` of ``value`` (0: background)."""
    bg = (label == value).float()[None, None]
    frac = F.adaptive_avg_pool2d(bg, high.shape[-2:])[0, 0]
    cells = F.normalize(high.flatten(1).T, dim=1)  # (h*w, C)
    return cells[frac.flatten() >= min_fraction]


def spherical_kmeans(x: Tensor, k: int, seed: int, iters: int = 20) -> Tensor:
    """Cluster centres (k, C), unit length, of the unit vectors ``x`` (n, C) by cosine similarity.

    k-means++ seeding from a generator of ``seed``, then ``iters`` Lloyd steps; deterministic for a given
    input. A centre that loses all its members keeps its previous position."""
    n = x.shape[0]
    if n < k:
        raise DataError(f"{n} background cells cannot form {k} pseudo-classes; lower the number of clusters")
    g = torch.Generator().manual_seed(int(seed))
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    best = (x @ x[first]).clone()
    for _ in range(1, k):
        dist = (1.0 - best).clamp_min(0.0)
        weights = dist if float(dist.sum()) > 0 else torch.ones_like(dist)  # all points on the centres
        pick = int(torch.multinomial(weights, 1, generator=g))
        centres.append(x[pick])
        best = torch.maximum(best, x @ x[pick])
    c = torch.stack(centres)
    for _ in range(iters):
        assign = (x @ c.T).argmax(dim=1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        moved = F.normalize(sums, dim=1)
        c = torch.where((counts > 0)[:, None], moved, c)
    return c


def assign_background(high: Tensor, label: Tensor, centres: Tensor, first_id: int, value: int = 0) -> Tensor:
    """``label`` (S, S) with each pixel of ``value`` (0: background) replaced by ``first_id + j``, j its
    nearest centre.

    The cosine similarity to each centre is computed on the feature grid and upsampled bilinearly to the
    label's size (as the model's logits are), so the regions follow the features' smooth boundaries."""
    sim = torch.einsum("kc,chw->khw", centres, F.normalize(high, dim=0))
    sim = F.interpolate(sim[None], label.shape[-2:], mode="bilinear", align_corners=False)[0]
    nearest = sim.argmax(dim=0) + first_id
    return torch.where(label == value, nearest.to(label.dtype), label)


def border_band(label: Tensor, width: int) -> Tensor:
    """(S, S) bool: the pixels within ``width`` of the edge of the image's non-padded area (the bounding
    box of its non-ignore pixels; the test transform pads at the bottom and right)."""
    valid = label != 255
    rows, cols = valid.any(dim=1).nonzero(), valid.any(dim=0).nonzero()
    if not len(rows):
        return torch.zeros_like(valid)
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    yy = torch.arange(label.shape[0])[:, None]
    xx = torch.arange(label.shape[1])[None]
    return (yy < width) | (xx < width) | (yy >= h - width) | (xx >= w - width)


def pseudo_class_pairs(
    labels: dict[str, Tensor], ids: Iterable[int], min_pixels: int
) -> dict[int, list[str]]:
    """Pseudo-class id -> the images (sorted) where it covers at least ``min_pixels`` label pixels."""
    wanted = list(ids)
    out: dict[int, list[str]] = {c: [] for c in wanted}
    lo, hi = min(wanted), max(wanted)
    for image_id in sorted(labels):
        counts = torch.bincount(labels[image_id].flatten().clamp(0, hi + 1), minlength=hi + 2)
        for c in range(lo, hi + 1):
            if int(counts[c]) >= min_pixels:
                out[c].append(image_id)
    return {c: ims for c, ims in out.items() if ims}


def fit_pseudo_classes(
    features: Iterable[tuple[str, Tensor]],
    labels: dict[str, Tensor],
    k: int,
    first_id: int,
    seed: int,
    min_pixels: int,
) -> tuple[dict[str, Tensor], dict[int, list[str]], Tensor]:
    """Fit ``k`` background clusters on ``features`` ((image id, high (C, h, w)) of the training images)
    and relabel their background.

    Returns the relabelled labels (the ids of ``features``; other labels are left as they are), the
    pseudo-class pairs (class id -> images, see :func:`pseudo_class_pairs`) and the centres (k, C)."""
    if first_id + k - 1 >= 255:
        raise DataError(f"{k} pseudo-classes after class {first_id - 1} would reach the ignore label 255")
    feats = dict(features)
    cells = [background_cells(h, labels[i]) for i, h in feats.items()]
    centres = spherical_kmeans(torch.cat(cells), k, seed)
    relabelled = dict(labels)
    on_border = torch.zeros(k + 1, dtype=torch.float64)
    total = torch.zeros(k + 1, dtype=torch.float64)
    for image_id, high in feats.items():
        lab = assign_background(high, labels[image_id], centres, first_id)
        relabelled[image_id] = lab
        # the band is one feature cell wide
        band = border_band(lab, -(-lab.shape[-1] // high.shape[-1]))
        ids = (lab - first_id).clamp(-1, k) + 1  # 0: not a pseudo-class pixel
        ids = torch.where((lab >= first_id) & (lab < first_id + k), ids, 0)
        total += torch.bincount(ids.flatten(), minlength=k + 1)[: k + 1].double()
        on_border += torch.bincount(ids[band], minlength=k + 1)[: k + 1].double()
    share = on_border[1:] / total[1:].clamp_min(1)
    positional = [first_id + j for j in range(k) if share[j] > 0.5]
    if positional:
        for image_id in feats:
            lab = relabelled[image_id]
            relabelled[image_id] = torch.where(torch.isin(lab, torch.tensor(positional)), 0, lab)
    kept = [c for c in range(first_id, first_id + k) if c not in positional]
    pairs = pseudo_class_pairs({i: relabelled[i] for i in feats}, kept, min_pixels)
    return relabelled, pairs, centres


def fit_part_classes(
    features: Iterable[tuple[str, Tensor]],
    labels: dict[str, Tensor],
    classes: Iterable[int],
    parts: int,
    first_id: int,
    seed: int,
    min_pixels: int,
) -> tuple[dict[str, Tensor], dict[int, list[str]]]:
    """Part pseudo-classes: each class of ``classes`` split into ``parts`` regions by spherical k-means of
    the frozen features of its own cells (over every training image), so that a training episode can ask
    for a *part* of an object (a person's face, hair or clothes, a bicycle's wheels) and the heads learn to
    stop where the support's mask stops instead of growing it to the whole object.

    Returns part label maps, in which every pixel of class ``c`` (the i-th of ``classes``) becomes
    ``first_id + i * parts + j`` (j its nearest centre of that class) and every other pixel keeps its label,
    and the part pairs (part id -> images where it covers at least ``min_pixels``). A class with fewer
    cells than ``parts`` is not split (its pixels keep their label and it forms no part episode)."""
    order = sorted(set(classes))
    if first_id + len(order) * parts - 1 >= 255:
        raise DataError(
            f"{parts} parts for each of {len(order)} classes after label {first_id - 1} would reach the "
            "ignore label 255; lower the number of parts"
        )
    feats = dict(features)
    relabelled = dict(labels)
    split: list[int] = []
    for i, c in enumerate(order):
        cells = [background_cells(h, labels[n], value=c) for n, h in feats.items() if (labels[n] == c).any()]
        cells = torch.cat(cells) if cells else torch.zeros(0, 1)
        if cells.shape[0] < max(parts, 2):
            continue
        centres = spherical_kmeans(cells, parts, seed + c)
        ids = first_id + i * parts
        for n, high in feats.items():
            if (relabelled[n] == c).any():
                relabelled[n] = assign_background(high, relabelled[n], centres, ids, value=c)
        split.extend(range(ids, ids + parts))
    pairs = pseudo_class_pairs({n: relabelled[n] for n in feats}, split, min_pixels) if split else {}
    return relabelled, pairs
