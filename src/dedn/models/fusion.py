"""Adaptive Weighted Fusion (AWF): weight the experts by how well each one segments the support set.

Per episode, each expert predicts the support images themselves (K = 1: the support is its own query;
K > 1: leave-one-out over the shots, or each shot as its own query with ``support_pass = self``) and is
scored by soft IoU against the support masks: r_e. The episode weights are w = softmax(r / tau). Per
pixel, each expert's prediction is further weighted by its confidence c_e = 1 - H(p_e) / log 2. This uses
no query label and no training on the novel class: it is how the trained experts are adapted to a class
they have never seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.models.ops import binary_confidence


def fusion_weights(support_scores: Tensor, temperature: float) -> Tensor:
    """(B, E) soft IoU of each expert on the support -> (B, E) weights summing to 1."""
    return (support_scores / temperature).softmax(dim=1)


def fuse_probabilities(
    probs: list[Tensor],
    weights: Tensor,
    use_confidence: bool = True,
    pixel_weights: list[Tensor | None] | None = None,
) -> Tensor:
    """Fuse per-expert probabilities (each (B, 2, H, W)) with episode weights (B, E) -> (B, 2, H, W).
    ``pixel_weights``: per member, None or a (B, 1, H, W) factor on its weight at each pixel."""
    stacked = torch.stack(probs, dim=1)  # (B, E, 2, H, W)
    w = weights[:, :, None, None, None]
    if pixel_weights is not None and any(x is not None for x in pixel_weights):
        ones = torch.ones_like(probs[0][:, :1])
        w = w * torch.stack([ones if x is None else x for x in pixel_weights], dim=1)
    if use_confidence:
        conf = torch.stack([binary_confidence(p) for p in probs], dim=1)  # (B, E, 1, H, W)
        w = w * (conf + 1e-3)  # the floor keeps the mixture defined when every expert is unsure
    return (w * stacked).sum(dim=1) / w.sum(dim=1)


class FusionGate(nn.Module):
    """A learned per-pixel weighting of two experts: from each expert's foreground probability and
    confidence (detached: the gate learns to fuse, it does not change the experts), a small conv net gives
    the first expert's weight ``w`` per cell; ``p = w p_1 + (1 - w) p_2``. Initialised to plain averaging.
    It sees only the experts' outputs, which mean the same for any class, so it carries over to novel ones.
    """

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(4, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 3, padding=1)
        )
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, logits: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Two experts' logits (B, 2, h, w) at the feature grid -> the fused probability (B, 2, H, W) at
        ``size`` and the weight map (B, 1, H, W) of the first expert."""
        logits = [x.detach() for x in logits]
        probs = [x.softmax(dim=1) for x in logits]
        x = torch.cat([p[:, 1:] for p in probs] + [binary_confidence(p) for p in probs], dim=1)
        w = torch.sigmoid(F.interpolate(self.net(x), size, mode="bilinear", align_corners=False))
        # the experts' probabilities as the other fusions see them: logits upsampled, then softmax
        up = [F.interpolate(z, size, mode="bilinear", align_corners=False).softmax(dim=1) for z in logits]
        return w * up[0] + (1 - w) * up[1], w
