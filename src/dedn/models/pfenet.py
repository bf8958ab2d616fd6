"""PFENet as a peer method in this harness (``model.method: pfenet``).

Written for this project from the paper's description: Tian, Zhao, Shu, Yang, Li, Jia, *Prior Guided
Feature Enrichment Network for Few-Shot Segmentation*, IEEE TPAMI 2020. What is taken from the paper and
what differs is listed in docs/method.md ("Peers in the same harness: PFENet").

Inputs, as for DEDN's experts: the reduced mid-level features of the query ``fq`` (B, C, h, w) and of the
supports ``fs`` (B, K, C, h, w), the supports' foreground fraction per cell (B, K, 1, h, w) and the frozen
high-level features of both, from which the training-free prior mask is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.config import PFENetConfig
from dedn.models.experts import Classifier, conv_relu
from dedn.models.ops import area_pool, masked_average_pool, masked_cosine_prior


def scale_sizes(grid: tuple[int, int], scales: list[float]) -> list[tuple[int, int]]:
    """The pooled size of each FEM scale on a feature grid: each side times the fraction, rounded half
    up, at least 1 (PFENet's 60, 30, 15, 8 on 60; 27, 14, 7, 4 on 27 with the default fractions)."""
    return [tuple(max(1, int(side * f + 0.5)) for side in grid) for f in scales]


def mean_prototype(fs: Tensor, support_fg: Tensor) -> Tensor:
    """Masked average pooling of each shot's features, then the plain mean over the K shots (PFENet):
    (B, K, C, h, w), (B, K, 1, h, w) -> (B, C)."""
    b, k, c = fs.shape[:3]
    return masked_average_pool(fs.flatten(0, 1), support_fg.flatten(0, 1)).view(b, k, c).mean(dim=1)


def _resize(x: Tensor, size) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size, mode="bilinear", align_corners=True)


class InterScaleMerge(nn.Module):
    """The merging module of one scale: ``x + conv1x1([x, previous])`` (when a previous, larger scale
    exists and the inter-scale path is on), then a residual pair of 3x3 convolutions."""

    def __init__(self, channels: int, receives: bool):
        super().__init__()
        self.fuse = conv_relu(2 * channels, channels, 1) if receives else None
        self.refine = nn.Sequential(conv_relu(channels, channels, 3), conv_relu(channels, channels, 3))

    def forward(self, x: Tensor, previous: Tensor | None) -> Tensor:
        if self.fuse is not None and previous is not None:
            x = x + self.fuse(torch.cat([x, _resize(previous, x.shape[-2:])], dim=1))
        return x + self.refine(x)


class FeatureEnrichment(nn.Module):
    """The Feature Enrichment Module (FEM).

    At each scale (pooled size ``scale_sizes``): ``[pool(Fq), tile(p), resize(Y)]`` -> 1x1 conv
    (inter-source enrichment); the merging module with the previous, larger scale's output (inter-scale
    interaction, top-down: from the largest scale to the smallest); a classifier per scale (intermediate
    supervision). Then every scale is upsampled to the first one's size, concatenated and reduced by a
    1x1 conv. Returns that (B, C, h0, w0) map and the per-scale logits, one (B, 2, h_i, w_i) per scale.
    """

    def __init__(self, channels: int, cfg: PFENetConfig, dropout: float):
        super().__init__()
        self.scales = list(cfg.scales)
        n = len(self.scales)
        self.enrich = nn.ModuleList([conv_relu(2 * channels + 1, channels, 1) for _ in range(n)])
        self.merge = nn.ModuleList([InterScaleMerge(channels, i > 0 and cfg.inter_scale) for i in range(n)])
        self.classifiers = nn.ModuleList([Classifier(channels, dropout) for _ in range(n)])
        self.project = conv_relu(n * channels, channels, 1)

    def forward(self, fq: Tensor, prototype: Tensor, prior: Tensor) -> tuple[Tensor, list[Tensor]]:
        sizes = scale_sizes(tuple(fq.shape[-2:]), self.scales)
        merged, intermediate = [], []
        previous = None
        for i, size in enumerate(sizes):
            query = area_pool(fq, size)
            tiled = prototype[:, :, None, None].expand(-1, -1, *size)
            x = self.enrich[i](torch.cat([query, tiled, _resize(prior, size)], dim=1))
            x = self.merge[i](x, previous)
            intermediate.append(self.classifiers[i](x))
            merged.append(x)
            previous = x
        top = sizes[0]
        return self.project(torch.cat([_resize(x, top) for x in merged], dim=1)), intermediate


class PFENetHead(nn.Module):
    """Prior + support prototype + FEM + the final classifier (a 1x1-reduced map refined by a residual pair
    of 3x3 convolutions, as after PFENet's FEM)."""

    def __init__(self, channels: int, cfg: PFENetConfig, dropout: float = 0.1):
        super().__init__()
        self.fem = FeatureEnrichment(channels, cfg, dropout)
        self.refine = nn.Sequential(conv_relu(channels, channels, 3), conv_relu(channels, channels, 3))
        self.classifier = Classifier(channels, dropout)

    def forward(
        self, fq: Tensor, fs: Tensor, support_fg: Tensor, query_high: Tensor, support_high: Tensor
    ) -> dict:
        prototype = mean_prototype(fs, support_fg)  # (B, C)
        with torch.no_grad():  # frozen features only: nothing to train before it
            prior = masked_cosine_prior(query_high, support_high, support_fg)  # (B, 1, h, w)
        x, intermediate = self.fem(fq, prototype, prior)
        x = x + self.refine(x)
        logits = self.classifier(x)
        if tuple(logits.shape[-2:]) != tuple(fq.shape[-2:]):  # a first scale below 1: back to the grid
            logits = _resize(logits, fq.shape[-2:])
        return {"logits": logits, "intermediate": intermediate, "prior": prior, "prototype": prototype}
