"""HSNet as a peer method (``model.method: hsnet``), written for this project from the paper.

Min, Kang and Cho, *Hypercorrelation Squeeze for Few-Shot Segmentation*, ICCV 2021. The idea is theirs;
the code is this project's own, built from the paper's description (docs/method.md, "Peers in the same
harness: HSNet", says what differs). The parts:

* :func:`hypercorrelation`: for each frozen backbone layer, the cosine similarity of every query cell
  with every support cell, the support features masked by the support mask, ReLU'd: a 4D tensor
  (query h, w x support h, w) per layer; the layers of one pyramid level are its channels;
* :class:`CenterPivotConv4d`: a 4D convolution whose kernel is zero except on its two *center-pivot*
  planes, computed as two 2D convolutions: one over the query dims at the support kernel's center, one
  over the support dims at the query kernel's center; a stride on the support dims squeezes them;
* :class:`HSNetHead`: per pyramid level, blocks of center-pivot conv + group norm + ReLU that squeeze the
  support dims; coarse-to-fine mixing (the deeper level resized to the shallower one's size, added, and
  mixed by two more blocks); the support dims averaged away; a 2D decoder to two-class logits.

Shapes: B episodes, K shots, L layers of a pyramid level, C channels, (h, w) the feature grid. A 4D
feature map is (N, C, hq, wq, hs, ws).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.config import HSNetConfig

__all__ = ["CenterPivotConv4d", "HSNetHead", "hypercorrelation", "resize_4d", "vote_logits"]

#: HSNet's K-shot vote: a pixel is foreground where at least this share of the largest vote count agrees
VOTE_THRESHOLD = 0.5
#: the scale of the vote's logits (a unanimous pixel gets a foreground logit of 5, an unvoted one -5)
_VOTE_SCALE = 10.0


def hypercorrelation(query: list[Tensor], support: list[Tensor], support_fg: Tensor) -> Tensor:
    """The correlations of one pyramid level: (N, L, hq, wq, hs, ws), every value in [0, 1].

    ``query[l]`` (N, C_l, hq, wq) and ``support[l]`` (N, C_l, hs, ws) are the features of layer ``l``;
    ``support_fg`` (N, 1, hs, ws) the support mask at the feature grid (here the foreground share of each
    cell). Each layer gives ``relu(cos(q_i, m_j * s_j))``: the support features are multiplied by the mask
    before the cosine, as in the paper, so a cell outside the mask (m = 0) correlates with nothing (0),
    while any cell with foreground in it gives its full cosine (the cosine ignores the scale m > 0).
    """
    maps = []
    for q, s in zip(query, support, strict=True):
        n, _, hq, wq = q.shape
        hs, ws = s.shape[-2:]
        qn = F.normalize(q.flatten(2), dim=1)
        sn = F.normalize((s * support_fg).flatten(2), dim=1)  # a zero vector stays zero
        corr = torch.einsum("ncq,ncs->nqs", qn, sn).clamp_min(0.0)
        maps.append(corr.view(n, hq, wq, hs, ws))
    return torch.stack(maps, dim=1)


class CenterPivotConv4d(nn.Module):
    """A center-pivot 4D convolution over (query h, w, support h, w).

    Equals a 4D convolution (zero padding ``k // 2`` on every dim, stride 1 on the query dims and
    ``support_stride`` on the support dims) whose k x k x k x k kernel is zero except on two planes: the
    query-dims plane at the support center, ``W[..., :, :, c, c]``, and the support-dims plane at the
    query center, ``W[..., c, c, :, :]`` (the two meet at the central element, where they add). Cost:
    two 2D convolutions instead of one 4D one (O(k^2) instead of O(k^4) per output cell).

    Input (N, C_in, hq, wq, hs, ws) -> (N, C_out, hq, wq, ceil(hs / s), ceil(ws / s)).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, support_stride: int = 1):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size = {kernel_size}; expected an odd number")
        if support_stride < 1:
            raise ValueError(f"support_stride = {support_stride}; expected at least 1")
        pad = kernel_size // 2
        self.stride = support_stride
        self.out_channels = out_channels
        # over the query dims, one 2D conv applied at every (strided) support position
        self.query_conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad)
        # over the support dims, strided, applied at every query position
        self.support_conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=support_stride, padding=pad
        )

    def forward(self, x: Tensor) -> Tensor:
        n, c, hq, wq, hs, ws = x.shape
        o, s = self.out_channels, self.stride
        # the query-dims plane sits at the support kernel's center: with padding k // 2 that is the
        # support input cell (i * s, j * s) for output support cell (i, j)
        pivots = x[..., ::s, ::s] if s > 1 else x
        ho, wo = pivots.shape[-2:]
        q = pivots.permute(0, 4, 5, 1, 2, 3).reshape(n * ho * wo, c, hq, wq)
        q = self.query_conv(q).view(n, ho, wo, o, hq, wq).permute(0, 3, 4, 5, 1, 2)
        sup = x.permute(0, 2, 3, 1, 4, 5).reshape(n * hq * wq, c, hs, ws)
        sup = self.support_conv(sup).view(n, hq, wq, o, ho, wo).permute(0, 3, 1, 2, 4, 5)
        return q + sup


def resize_4d(x: Tensor, size: tuple[int, int, int, int]) -> Tensor:
    """Bilinear resize of a 4D map (N, C, hq, wq, hs, ws) to ``size`` = (hq', wq', hs', ws'): the query
    dims, then the support dims (each a 2D bilinear resize). The identity when the size already fits."""
    n, c, hq, wq, hs, ws = x.shape
    if (hq, wq, hs, ws) == tuple(size):
        return x
    hq2, wq2, hs2, ws2 = size
    y = x.permute(0, 1, 4, 5, 2, 3).reshape(n, c * hs * ws, hq, wq)
    y = F.interpolate(y, (hq2, wq2), mode="bilinear", align_corners=False)
    y = y.view(n, c, hs, ws, hq2, wq2).permute(0, 1, 4, 5, 2, 3).reshape(n, c * hq2 * wq2, hs, ws)
    y = F.interpolate(y, (hs2, ws2), mode="bilinear", align_corners=False)
    return y.view(n, c, hq2, wq2, hs2, ws2)


def _block(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        CenterPivotConv4d(in_channels, out_channels, kernel, stride),
        nn.GroupNorm(groups, out_channels),  # takes any trailing dims: statistics over (C/G, hq, wq, hs, ws)
        nn.ReLU(inplace=True),
    )


class HSNetHead(nn.Module):
    """The trainable part of HSNet: squeezing, mixing, decoding.

    ``layers_per_level``: how many layers feed each pyramid level, shallowest (finest) level first.
    """

    def __init__(self, layers_per_level: list[int], cfg: HSNetConfig):
        super().__init__()
        k, g = cfg.kernel_size, cfg.groups
        widths = list(cfg.channels)
        out = widths[-1]

        def squeezer(layers: int) -> nn.Sequential:
            blocks, c_in = [], layers
            for width, stride in zip(widths, cfg.support_strides, strict=True):
                blocks.append(_block(c_in, width, k, stride, g))
                c_in = width
            return nn.Sequential(*blocks)

        self.squeeze = nn.ModuleList(squeezer(n) for n in layers_per_level)
        # one mixing step per level below the deepest: after the deeper result is added to it
        self.mix = nn.ModuleList(
            nn.Sequential(_block(out, out, k, 1, g), _block(out, out, k, 1, g)) for _ in layers_per_level[:-1]
        )
        d = cfg.decoder_channels
        self.decoder_low = nn.Sequential(
            nn.Conv2d(out, d, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(d, d, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.decoder_high = nn.Sequential(
            nn.Conv2d(d, d // 2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(d // 2, 2, 3, padding=1),
        )

    def encode(self, correlations: list[Tensor]) -> Tensor:
        """Squeeze each level and mix them coarse to fine: (N, C, hq, wq, hs', ws')."""
        squeezed = [block(c) for block, c in zip(self.squeeze, correlations, strict=True)]
        x = squeezed[-1]
        for level in range(len(squeezed) - 2, -1, -1):
            finer = squeezed[level]
            x = self.mix[level](finer + resize_4d(x, finer.shape[-4:]))
        return x

    def decode(self, x: Tensor) -> Tensor:
        """(N, C, hq, wq) query features -> (N, 2, 2 hq, 2 wq) logits."""
        x = self.decoder_low(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.decoder_high(x)

    def forward(
        self, query: list[list[Tensor]], support: list[list[Tensor]], support_fg: Tensor, joint: bool
    ) -> Tensor:
        """Per-shot or joint logits: (B, K, 2, 2h, 2w) one pass per shot, or (B, 1, 2, 2h, 2w) ``joint``.

        ``query[level][layer]`` (B, C, h, w); ``support[level][layer]`` (B, K, C, h, w); ``support_fg``
        (B, K, 1, h, w). ``joint``: the K shots' squeezed support dims are averaged together (all K x hs' x
        ws' cells at once) before one decoder pass; otherwise each shot is its own 1-shot pass.
        """
        b, k = support_fg.shape[:2]

        def per_shot(t: Tensor) -> Tensor:  # (B, C, h, w) -> (B*K, C, h, w), each query once per shot
            return t.unsqueeze(1).expand(b, k, *t.shape[1:]).flatten(0, 1)

        fg = support_fg.flatten(0, 1)
        correlations = [
            hypercorrelation([per_shot(q) for q in qs], [s.flatten(0, 1) for s in ss], fg)
            for qs, ss in zip(query, support, strict=True)
        ]
        x = self.encode(correlations)  # (B*K, C, h, w, hs', ws')
        if joint:
            pooled = x.view(b, k, *x.shape[1:]).mean(dim=(1, 5, 6))  # (B, C, h, w)
            return self.decode(pooled).unsqueeze(1)
        logits = self.decode(x.mean(dim=(4, 5)))
        return logits.view(b, k, *logits.shape[1:])


def vote_logits(shot_logits: Tensor) -> Tensor:
    """HSNet's K-shot vote on the K passes' logits (B, K, 2, H, W) -> logits (B, 2, H, W).

    Each pass votes for the pixels it calls foreground; the votes are divided by the largest vote count
    of the image (at least 1), and a pixel is foreground where that share is at least 0.5. The logits
    returned are 0 (background) and ``10 * (share - 0.5) + 0.01`` (foreground), so the argmax is the vote.
    """
    votes = (shot_logits[:, :, 1] > shot_logits[:, :, 0]).float().sum(dim=1)  # (B, H, W)
    top = votes.flatten(1).max(dim=1).values.clamp_min(1.0).view(-1, 1, 1)
    share = votes / top
    fg = _VOTE_SCALE * (share - VOTE_THRESHOLD) + 0.01
    return torch.stack([torch.zeros_like(fg), fg], dim=1)
