"""Small tensor operations shared by the experts and the baselines.

Shapes: B episodes, K shots, C channels, (h, w) the feature grid, (H, W) the network input.
Masks are {0, 1, 255} label maps; 255 pixels count as neither foreground nor background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-6


def mask_fractions(masks: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Foreground and background fraction of each feature cell.

    masks: (N, H, W) in {0, 1, 255} -> fg, bg: (N, 1, h, w) in [0, 1]. Area pooling (not nearest
    sampling) so that thin objects still reach the coarse grid.
    """
    fg = (masks == 1).float().unsqueeze(1)
    bg = (masks == 0).float().unsqueeze(1)
    return F.adaptive_avg_pool2d(fg, size), F.adaptive_avg_pool2d(bg, size)


def masked_average_pool(features: Tensor, weights: Tensor) -> Tensor:
    """Masked average pooling (MAP): (N, C, h, w), (N, 1, h, w) -> (N, C).

    An empty mask gives a zero vector rather than NaN.
    """
    total = weights.sum(dim=(2, 3))
    return (features * weights).sum(dim=(2, 3)) / (total + EPS)


def min_max_normalize(x: Tensor) -> Tensor:
    """Per-sample min-max normalisation of (N, 1, h, w) maps to [0, 1]; a constant map becomes 0."""
    flat = x.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    return ((flat - lo) / (hi - lo + EPS)).view_as(x)


def cosine_prior(query_high: Tensor, support_high: Tensor, support_fg: Tensor) -> Tensor:
    """Training-free prior of PFENet: each query pixel's best cosine match among support fg pixels.

    query_high: (B, C, h, w); support_high: (B, K, C, h, w); support_fg: (B, K, 1, h, w).
    Returns (B, 1, h, w) in [0, 1]: min-max normalised per shot, then averaged over shots.
    """
    b, k, c, h, w = support_high.shape
    q = F.normalize(query_high.flatten(2), dim=1)  # (B, C, hw)
    priors = []
    # a traced graph (ONNX export) cannot size a tensor from the data: compare with every cell there
    gather = not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())
    for shot in range(k):
        fg = support_fg[:, shot].flatten(1) > 0.5  # (B, hw)
        count = fg.sum(dim=1)  # (B,)
        s = support_high[:, shot].flatten(2)  # (B, C, hw)
        if gather:
            # only support foreground cells can be the best match: compare with those alone (a few tens
            # of the hundreds of cells), gathered into a (B, C, n) block padded to the largest count
            n = max(int(count.max()), 1)
            order = torch.argsort((~fg).to(torch.uint8), dim=1, stable=True)[:, :n]  # fg cells first
            keep = torch.arange(n, device=fg.device).unsqueeze(0) < count.unsqueeze(1)  # (B, n)
            s = s.gather(2, order.unsqueeze(1).expand(b, c, n))
        else:
            keep = fg
        sim = torch.einsum("bcq,bcs->bqs", q, F.normalize(s, dim=1))  # (B, hw_q, n)
        sim = sim.masked_fill(~keep.unsqueeze(1), -2.0)
        best = sim.max(dim=2).values.view(b, 1, h, w)
        empty = count == 0
        best = torch.where(empty.view(b, 1, 1, 1), torch.zeros_like(best), best)
        priors.append(min_max_normalize(best))
    return torch.stack(priors, dim=0).mean(dim=0)


def masked_cosine_prior(query_high: Tensor, support_high: Tensor, support_fg: Tensor) -> Tensor:
    """PFENet's prior mask as its paper writes it (Tian et al., TPAMI 2020, section 3.2).

    The support features are multiplied by the support mask, ``X_s = H_s * M_s``; each query cell takes
    its largest cosine similarity to any cell of ``X_s``, ``c_q = max_s cos(x_q, x_s)``, where a cell the
    mask zeroes counts as similarity 0; ``Y = (c - min c) / (max c - min c + eps)`` per query, then the
    mean over shots. The mask here is the area fraction of each cell (the grid's ``support_fg``): cosine
    similarity ignores the scale, so every cell the mask touches counts with its whole feature.

    It differs from :func:`cosine_prior` (DEDN's object expert) in two ways: that one keeps only cells whose
    foreground fraction is above 0.5, and has no similarity-0 floor from the masked-out cells.

    query_high: (B, C, h, w); support_high: (B, K, C, h, w); support_fg: (B, K, 1, h, w) in [0, 1].
    Returns (B, 1, h, w) in [0, 1]. A shot whose mask is empty gives a constant map, hence 0.
    """
    b, k, c, h, w = support_high.shape
    q = F.normalize(query_high.flatten(2), dim=1)  # (B, C, hw); a zero vector stays zero
    priors = []
    for shot in range(k):  # one (hw x hw) similarity block at a time
        s = F.normalize((support_high[:, shot] * support_fg[:, shot]).flatten(2), dim=1)  # (B, C, hw)
        best = torch.einsum("bcq,bcs->bqs", q, s).max(dim=2).values.view(b, 1, h, w)
        priors.append(min_max_normalize(best))
    return torch.stack(priors, dim=0).mean(dim=0)


def pooling_matrix(n_in: int, n_out: int, device=None, dtype=None) -> Tensor:
    """(n_out, n_in) matrix whose rows average the input bins of ``adaptive_avg_pool1d``.

    Bin ``i`` covers ``[floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out))``, as in PyTorch, so
    ``P_h @ x @ P_w.T`` equals ``adaptive_avg_pool2d(x, (h, w))``.
    """
    rows = []
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(n_in)])
    # from Python numbers, so that a traced graph (ONNX export) records it as a constant
    return torch.tensor(rows, device=device, dtype=dtype if dtype is not None else torch.float32)


def area_pool(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``adaptive_avg_pool2d(x, size)`` of (N, C, h, w) written as two matrix products, which an ONNX
    export traces for any sizes (the exporter takes adaptive pooling only when ``size`` divides ``h, w``)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    rows = pooling_matrix(h, size[0], x.device, x.dtype)
    cols = pooling_matrix(w, size[1], x.device, x.dtype)
    return torch.einsum("nchw,ih,jw->ncij", x, rows, cols)


def self_affinity(features: Tensor, temperature: float, window: int = 0) -> Tensor:
    """Row-softmax of the cosine self-affinity of (B, C, h, w) features -> (B, hw, hw).

    ``window`` > 0 keeps only pixels within a (2*window+1)^2 neighbourhood.
    """
    b, c, h, w = features.shape
    f = F.normalize(features.flatten(2), dim=1)
    logits = torch.einsum("bci,bcj->bij", f, f) / temperature
    if window > 0:
        ys, xs = torch.meshgrid(
            torch.arange(h, device=features.device), torch.arange(w, device=features.device), indexing="ij"
        )
        ys, xs = ys.flatten(), xs.flatten()
        far = ((ys[:, None] - ys[None, :]).abs() > window) | ((xs[:, None] - xs[None, :]).abs() > window)
        logits = logits.masked_fill(far.unsqueeze(0), float("-inf"))
    return logits.softmax(dim=2)


def continuity_guidance(
    prior: Tensor, features: Tensor, steps: int, temperature: float, window: int = 0
) -> Tensor:
    """Object Continuity Guidance: spread the prior over the object's continuous extent.

    ``G = norm(A^t Y)`` with A the query self-affinity: a pixel inherits the prior of the pixels that look
    like it, so a prior that fires only on an object's most discriminative part reaches the rest of it.
    prior: (B, 1, h, w), features: (B, C, h, w) -> (B, 1, h, w) in [0, 1].
    """
    b, _, h, w = prior.shape
    affinity = self_affinity(features, temperature, window)  # (B, hw, hw)
    g = prior.flatten(2).transpose(1, 2)  # (B, hw, 1)
    for _ in range(steps):
        g = torch.bmm(affinity, g)
    return min_max_normalize(g.transpose(1, 2).reshape(b, 1, h, w))


def scene_normalize(features: Tensor) -> Tensor:
    """Scenario Normalization: standardise each channel by the image's own scene statistics.

    (N, C, h, w) -> (N, C, h, w) with zero mean and unit variance per image and channel, no affine.
    """
    mean = features.mean(dim=(2, 3), keepdim=True)
    std = features.std(dim=(2, 3), keepdim=True, unbiased=False)
    return (features - mean) / (std + 1e-5)


def scene_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    return features.mean(dim=(2, 3), keepdim=True), features.std(dim=(2, 3), keepdim=True, unbiased=False)


def gram_matrix(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, C, C): the cosine similarity between every two channels' spatial maps."""
    f = F.normalize(x.flatten(2), dim=2)
    return torch.bmm(f, f.transpose(1, 2))


def gram_distances(query: Tensor, support: Tensor) -> Tensor:
    """Frobenius distance of the query's Gram matrix to each shot's: (B, C, h, w), (B, K, C, h, w) ->
    (B, K)."""
    gq = gram_matrix(query)
    diffs = [(gq - gram_matrix(support[:, k])).flatten(1).norm(dim=1) for k in range(support.shape[1])]
    return torch.stack(diffs, dim=1)


def gram_difference(query: Tensor, support: Tensor) -> Tensor:
    """BAM's scene difference: Frobenius distance of the Gram matrices.

    query (B, C, h, w), support (B, K, C, h, w) -> (B,), averaged over shots.
    """
    return gram_distances(query, support).mean(dim=1) / query.shape[1]


def soft_iou(fg_prob: Tensor, masks: Tensor) -> Tensor:
    """Soft IoU of foreground probabilities (N, H, W) against {0, 1, 255} masks (N, H, W) -> (N,).

    Ignore pixels are left out; an empty union gives 0.
    """
    # a pixel is its own cell: its foreground and background fractions are 0 or 1
    return soft_iou_fractions(fg_prob, (masks == 1).float(), (masks == 0).float())


def soft_iou_fractions(fg_prob: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
    """:func:`soft_iou` on a coarse grid: foreground probabilities (N, h, w) against each cell's
    foreground and background fractions (N, h, w) (:func:`mask_fractions`) -> (N,). A cell counts with its
    labelled share (``fg + bg``; the rest is "ignore"), its target is its foreground share; an empty
    union gives 0. On a grid as fine as the mask, :func:`soft_iou`."""
    p = fg_prob * (fg + bg)
    inter = (p * fg).sum(dim=(1, 2))
    union = (p + fg - p * fg).sum(dim=(1, 2))
    return torch.where(union > 0, inter / union.clamp_min(EPS), torch.zeros_like(union))


def binary_confidence(prob: Tensor) -> Tensor:
    """1 - H(p) / log 2 for two-class probabilities (N, 2, H, W) -> (N, 1, H, W) in [0, 1]."""
    entropy = -(prob * prob.clamp_min(1e-8).log()).sum(dim=1, keepdim=True)
    return (1.0 - entropy / torch.log(torch.tensor(2.0, device=prob.device))).clamp(0.0, 1.0)


def background_coverage(query_high: Tensor, support_high: Tensor, bg: Tensor) -> Tensor:
    """How well the supports' background covers each query cell: (B, 1, h, w), the highest cosine
    similarity of the query cell's feature (``query_high`` (B, C, h, w)) to a support cell that is mostly
    background (``bg`` (B, K, 1, h', w') above 0.5) in any shot (``support_high`` (B, K, C, h', w')). An
    episode whose supports have no such cell gets 1 everywhere (nothing to judge by)."""
    b, k = support_high.shape[:2]
    q = F.normalize(query_high, dim=1).flatten(2)  # (B, C, hw)
    best = torch.full((b, q.shape[2]), -2.0, device=q.device, dtype=q.dtype)
    for i in range(k):  # shot by shot: one (hw x hw') similarity matrix at a time
        s = F.normalize(support_high[:, i], dim=1).flatten(2)  # (B, C, hw')
        sim = torch.einsum("bcq,bcs->bqs", q, s)
        keep = (bg[:, i].flatten(1) > 0.5)[:, None, :]  # (B, 1, hw')
        best = torch.maximum(best, sim.masked_fill(~keep, -2.0).amax(dim=2))
    best = torch.where(best < -1.5, torch.ones_like(best), best)  # no background cell in any shot
    return best.view(b, 1, *query_high.shape[-2:])


def _balanced_cells(fg: Tensor, bg: Tensor, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The support cells' targets and class-balanced weights of the probe's fits, each (B, n) over the K
    shots' cells: ``t`` the foreground share of a labelled cell (fg + bg > 0.5; 0 elsewhere), ``wf`` and
    ``wb`` its weight as foreground and as background, each summing to 1 over the labelled cells (the
    foreground counts as much as the background, however few its cells)."""
    b = fg.shape[0]
    f, g = fg.reshape(b, -1).to(dtype), bg.reshape(b, -1).to(dtype)
    labelled = ((f + g) > 0.5).to(dtype)
    t = (f / (f + g).clamp_min(EPS)) * labelled  # soft target in [0, 1]
    wf = t / t.sum(dim=1, keepdim=True).clamp_min(EPS)
    wb = (1 - t) * labelled / ((1 - t) * labelled).sum(dim=1, keepdim=True).clamp_min(EPS)
    return t, wf, wb


def fit_support_probe(
    support_high: Tensor, fg: Tensor, bg: Tensor, init: Tensor, steps: int, l2: float
) -> tuple[Tensor, Tensor]:
    """A linear fg/bg classifier on the support's unit-length frozen features, fitted to its mask at test
    time: the `proto` matcher adapted to this support set.

    ``support_high`` (B, K, C, h, w); ``fg``/``bg`` (B, K, 1, h, w) the mask fractions per cell; ``init``
    (B, C) the starting direction (proto's: its logit difference is ``q . init`` for a unit ``q``). The
    loss is the class-balanced logistic loss over the labelled cells (fg and bg count alike, as the
    foreground is often a few cells) plus ``l2 * |w - init|^2``, which keeps the fit near the prototype
    direction; ``steps`` L-BFGS iterations. Returns w (B, C) and the bias b (B,); the probe's logit
    difference at a unit query vector ``q`` is ``q . w + b``. Deterministic; runs with gradients enabled
    whatever the caller's mode, and returns detached tensors."""
    b, k, c = support_high.shape[:3]
    x = F.normalize(support_high, dim=2).permute(0, 1, 3, 4, 2).reshape(b, -1, c).detach()  # (B, n, C)
    t, wf, wb = _balanced_cells(fg, bg, x.dtype)
    init = init.detach()
    w = init.clone().requires_grad_(True)
    bias = torch.zeros(b, dtype=x.dtype, device=x.device, requires_grad=True)

    def loss_fn() -> Tensor:
        z = torch.einsum("bnc,bc->bn", x, w) + bias[:, None]
        fit = (wf * F.softplus(-z) + wb * F.softplus(z)).sum(dim=1) / 2
        return (fit + l2 * (w - init).pow(2).sum(dim=1)).sum()

    with torch.enable_grad():
        opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        opt.step(closure)
    return w.detach(), bias.detach()


def fit_support_ridge(
    support_high: Tensor, fg: Tensor, bg: Tensor, l2: float, anchor: float
) -> tuple[Tensor, Tensor]:
    """A linear fg/bg decision on the support's unit-length frozen features by class-balanced ridge
    regression: the `probe` matcher's optional fit (``model.fusion.probe.fit = ridge``; docs/method.md,
    2g: better than the logistic fit on PASCAL-5i, not on the unseen sets).

    ``support_high`` (B, K, C, h, w); ``fg``/``bg`` (B, K, 1, h, w) the mask fractions per cell. Each
    labelled cell (fg + bg > 0.5) regresses its target 2t - 1 (t its foreground share, so +1 on the object,
    -1 off it), the foreground and the background cells weighing half each in all; the penalty
    ``l2 * |w - anchor * (p_fg - p_bg)|^2`` pulls the direction toward the difference of the unit-length
    prototypes of the labelled cells (proto's direction), the bias is free. With squared errors this is
    a Fisher discriminant of the support, shrunk toward proto: directions along which the support's
    cells vary much count little.
    Closed form (one (C+1) x (C+1) solve per support set), deterministic. Returns w (B, C) and b (B,):
    the decision at a unit query vector ``q`` is ``q . w + b``, about +1 on the object and -1 off it
    (used as the logit difference as it is)."""
    b, k, c = support_high.shape[:3]
    x = F.normalize(support_high, dim=2).permute(0, 1, 3, 4, 2).reshape(b, -1, c).detach()
    t, wf, wb = _balanced_cells(fg, bg, x.dtype)
    weight = (wf + wb) / 2  # (B, n): fg and bg count alike, whatever their areas
    target = 2 * t - 1
    pf = F.normalize(torch.einsum("bnc,bn->bc", x, wf), dim=1)
    pb = F.normalize(torch.einsum("bnc,bn->bc", x, wb), dim=1)
    x1 = torch.cat([x, torch.ones_like(x[..., :1])], dim=2)  # a constant feature: the bias
    # the weighted Gram matrix by one matrix product; the (C+1) x (C+1) system is solved in float64
    gram = ((x1 * weight[..., None]).transpose(1, 2) @ x1).double()
    rhs = torch.einsum("bnc,bn->bc", x1, weight * target).double()
    rhs[:, :c] += l2 * anchor * (pf - pb).double()
    penalty = torch.full((c + 1,), float(l2), dtype=gram.dtype, device=gram.device)
    penalty[-1] = 1e-6  # the bias is (almost) free
    solution = torch.linalg.solve(gram + torch.diag(penalty), rhs)
    dtype = support_high.dtype
    return solution[:, :c].to(dtype), solution[:, c].to(dtype)


def label_map(scores, floor: float = 0.0) -> Tensor:
    """N classes' (H, W) one-way scores -> one (H, W) label map: 0 where no class's score is above
    ``floor``, else the number (1..N) of the class with the largest score. With foreground logit margins
    and floor 0 (evaluation), or probabilities and the decision threshold (``Predictor.predict_classes``),
    every pixel keeps its one-way answer unless two classes claim it, and then goes to the likelier."""
    best, index = torch.stack(list(scores)).max(dim=0)
    return torch.where(best > floor, index + 1, torch.zeros_like(index))
