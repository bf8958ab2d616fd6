"""The two experts of DEDN (a reconstruction; see docs/method.md).

Both consume the same reduced mid-level features: query ``fq`` (B, C, h, w), supports ``fs``
(B, K, C, h, w), the supports' foreground/background fractions per feature cell (B, K, 1, h, w), and for
the object expert the frozen high-level features used by the training-free prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.config import ObjectExpertConfig, ScenarioExpertConfig
from dedn.models.ops import (
    continuity_guidance,
    cosine_prior,
    gram_difference,
    masked_average_pool,
    scene_normalize,
    scene_statistics,
)


def conv_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (no batch norm: episodes batches are small)."""

    def __init__(self, channels: int, dilation: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            conv_relu(channels, channels, 3, dilation),
            nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


class ContextPyramid(nn.Module):
    """ASPP-style context: parallel dilated 3x3 branches and a global-pool branch, fused by a 1x1."""

    def __init__(self, channels: int, rates: list[int]):
        super().__init__()
        self.branches = nn.ModuleList([conv_relu(channels, channels, 1 if r == 1 else 3, r) for r in rates])
        self.pool = conv_relu(channels, channels, 1)
        self.project = conv_relu(channels * (len(rates) + 1), channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True)).expand_as(x)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class Classifier(nn.Sequential):
    def __init__(self, channels: int, dropout: float):
        super().__init__(conv_relu(channels, channels, 3), nn.Dropout2d(dropout), nn.Conv2d(channels, 2, 1))


class ObjectExpert(nn.Module):
    """Object-level expert: "what is the target object".

    Inputs to its head: the query embedding, the tiled support prototype, their cosine map, the PFENet
    prior ``Y`` and the Object Continuity Guidance map ``G = norm(A^t Y)``.
    """

    def __init__(self, channels: int, cfg: ObjectExpertConfig, dropout: float = 0.1):
        super().__init__()
        self.cfg = cfg
        self.embed = conv_relu(channels, channels, 1)
        extra = 1 + int(cfg.use_prior) + int(cfg.use_prior and cfg.ocg.enabled)
        self.merge = nn.Sequential(conv_relu(2 * channels + extra, channels, 1), nn.Dropout2d(dropout))
        self.context = ContextPyramid(channels, cfg.aspp_rates)
        self.refine = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.classifier = Classifier(channels, dropout)

    def forward(
        self, fq: Tensor, fs: Tensor, support_fg: Tensor, query_high: Tensor, support_high: Tensor
    ) -> dict[str, Tensor]:
        b, k, c, h, w = fs.shape
        eq = self.embed(fq)  # (B, C, h, w)
        es = self.embed(fs.flatten(0, 1))  # (B*K, C, h, w)
        fg = support_fg.flatten(0, 1)
        # Prototype: masked average per shot, shots weighted by their foreground area so that an empty
        # shot does not pull the prototype towards zero.
        area = fg.sum(dim=(2, 3)).view(b, k, 1)  # (B, K, 1)
        per_shot = masked_average_pool(es, fg).view(b, k, c)
        prototype = (per_shot * area).sum(dim=1) / area.sum(dim=1).clamp_min(1e-6)  # (B, C)
        proto_map = prototype[:, :, None, None].expand(-1, -1, h, w)
        similarity = F.cosine_similarity(eq, proto_map, dim=1).unsqueeze(1)  # (B, 1, h, w)
        inputs = [eq, proto_map, similarity]
        maps: dict[str, Tensor] = {}
        if self.cfg.use_prior:
            prior = cosine_prior(query_high, support_high, support_fg)
            inputs.append(prior)
            maps["prior"] = prior
            if self.cfg.ocg.enabled:
                ocg = self.cfg.ocg
                guidance = continuity_guidance(prior, fq, ocg.steps, ocg.temperature, ocg.window)
                inputs.append(guidance)
                maps["guidance"] = guidance
        x = self.merge(torch.cat(inputs, dim=1))
        x = self.refine(self.context(x))
        return {
            "logits": self.classifier(x),
            "query_embedding": eq,
            "support_embedding": es.view(b, k, c, h, w),
            "prototype": prototype,
            **maps,
        }


class ScenarioExpert(nn.Module):
    """Scenario-level expert: "how does this whole scene relate to the support scene".

    Scenario Normalization standardises each image by its own scene statistics; dense cross-attention
    from every query pixel to every support pixel (foreground and background) then gives foreground and
    background evidence maps and an attended support context map.
    """

    def __init__(self, channels: int, cfg: ScenarioExpertConfig, dropout: float = 0.1):
        super().__init__()
        self.cfg = cfg
        d = cfg.attention_dim
        self.query_proj = nn.Conv2d(channels, d, 1)
        self.key_proj = nn.Conv2d(channels, d, 1)
        self.value_proj = conv_relu(channels, channels, 1)
        extra = 2 + int(cfg.gram_difference)
        self.merge = nn.Sequential(conv_relu(2 * channels + extra, channels, 1), nn.Dropout2d(dropout))
        self.refine = nn.Sequential(
            ResidualBlock(channels, 1), ResidualBlock(channels, 2), ResidualBlock(channels, 4)
        )
        self.classifier = Classifier(channels, dropout)

    def normalize(self, fq: Tensor, fs: Tensor) -> tuple[Tensor, Tensor]:
        mode = self.cfg.normalization
        if mode == "none":
            return fq, fs
        b, k, c, h, w = fs.shape
        qn = scene_normalize(fq)
        if mode == "instance":
            return qn, scene_normalize(fs.flatten(0, 1)).view(b, k, c, h, w)
        # adain: the normalised query takes the supports' scene statistics, so both are compared in the
        # support's "style"
        mean, std = scene_statistics(fs.flatten(0, 1))
        mean = mean.view(b, k, c, 1, 1).mean(dim=1)
        std = std.view(b, k, c, 1, 1).mean(dim=1)
        return qn * std + mean, fs

    def forward(self, fq: Tensor, fs: Tensor, support_fg: Tensor, support_bg: Tensor) -> dict[str, Tensor]:
        b, k, c, h, w = fs.shape
        qn, sn = self.normalize(fq, fs)
        q = F.normalize(self.query_proj(qn).flatten(2), dim=1)  # (B, d, hw)
        s_flat = sn.flatten(0, 1)
        key = F.normalize(self.key_proj(s_flat), dim=1)  # (B*K, d, h, w)
        key = key.view(b, k, -1, h * w).permute(0, 2, 1, 3).reshape(b, -1, k * h * w)  # (B, d, K*hw)
        value = self.value_proj(s_flat).view(b, k, c, h * w).permute(0, 2, 1, 3).reshape(b, c, k * h * w)
        fg = support_fg.reshape(b, k * h * w)
        bg = support_bg.reshape(b, k * h * w)
        logits = torch.einsum("bdq,bds->bqs", q, key) / self.cfg.temperature  # (B, hw, K*hw)
        # cells that are mostly "ignore" carry no label: they are not attended to
        labelled = (fg + bg) > 0.5
        logits = logits.masked_fill(~labelled.unsqueeze(1), -1e4)
        attention = logits.softmax(dim=2)
        fg_evidence = torch.bmm(attention, fg.unsqueeze(2)).transpose(1, 2).reshape(b, 1, h, w)
        bg_evidence = torch.bmm(attention, bg.unsqueeze(2)).transpose(1, 2).reshape(b, 1, h, w)
        context = torch.bmm(value, attention.transpose(1, 2)).view(b, c, h, w)
        inputs = [qn, context, fg_evidence, bg_evidence]
        if self.cfg.gram_difference:
            inputs.append(gram_difference(fq, fs).view(b, 1, 1, 1).expand(b, 1, h, w))
        x = self.refine(self.merge(torch.cat(inputs, dim=1)))
        return {"logits": self.classifier(x), "evidence": fg_evidence}
