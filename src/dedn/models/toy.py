"""A tiny random backbone for fast tests and smoke runs (``model.backbone: toy``).

Its weights come from a fixed seed, so it is deterministic, but it knows nothing about images: never use
it for results.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dedn.models.backbones import Backbone, FeatureLevel


class ToyBackbone(Backbone):
    name = "toy"

    def __init__(self, dilate: bool = True, seed: int = 0):
        super().__init__((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.stem = nn.Sequential(
                nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 24, 3, 2, 1), nn.ReLU()
            )
            self.stage1 = nn.Sequential(nn.Conv2d(24, 32, 3, 2, 1), nn.ReLU())
            self.stage2 = nn.Sequential(nn.Conv2d(32, 48, 3, 1, 1), nn.ReLU())
            self.stage3 = nn.Sequential(nn.Conv2d(48, 64, 3, 1, 2, dilation=2), nn.ReLU())
        finally:
            torch.random.set_rng_state(generator_state)
        self._stage_names = ("stage1", "stage2", "stage3")
        self.feature_info = {
            n: FeatureLevel(c, 8) for n, c in zip(self._stage_names, (32, 48, 64), strict=True)
        }
        self.default_levels = {"mid": ["stage1", "stage2"], "high": ["stage3"]}
        self._finish_init()

    def _run_stage(self, name: str, x: Tensor) -> Tensor:
        if name == "stage1":
            x = self.stem(x)
        return getattr(self, name)(x)


def build_toy(weights=None, dilate: bool = True) -> ToyBackbone:
    if weights not in (None, "imagenet", "none"):
        raise ValueError("the toy backbone has no weight files")
    return ToyBackbone(dilate)
