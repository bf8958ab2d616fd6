"""Adaptive Weighted Fusion (AWF): weight the experts by how well each one segments the support set.

Per episode, each expert predicts the support images themselves (K = 1: the support is its own query;
K > 1: leave-one-out over the shots) and is scored by soft IoU against the support masks: r_e. The episode
weights are w = softmax(r / tau). Per pixel, each expert's prediction is further weighted by its
confidence c_e = 1 - H(p_e) / log 2. This uses no query label and no training on the novel class: it is
how the trained experts are adapted to a class they have never seen.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dedn.models.ops import binary_confidence


def fusion_weights(support_scores: Tensor, temperature: float) -> Tensor:
    """(B, E) soft IoU of each expert on the support -> (B, E) weights summing to 1."""
    return (support_scores / temperature).softmax(dim=1)


def fuse_probabilities(probs: list[Tensor], weights: Tensor, use_confidence: bool = True) -> Tensor:
    """Fuse per-expert probabilities (each (B, 2, H, W)) with episode weights (B, E) -> (B, 2, H, W)."""
    stacked = torch.stack(probs, dim=1)  # (B, E, 2, H, W)
    w = weights[:, :, None, None, None]
    if use_confidence:
        conf = torch.stack([binary_confidence(p) for p in probs], dim=1)  # (B, E, 1, H, W)
        w = w * (conf + 1e-3)  # the floor keeps the mixture defined when every expert is unsure
    return (w * stacked).sum(dim=1) / w.sum(dim=1)
