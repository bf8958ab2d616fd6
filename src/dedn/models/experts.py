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


def input_norm(width: int, enabled: bool) -> nn.Module:
    """Batch norm over the head's relation maps (``enabled``), else identity. Cosine similarities,
    attention shares and priors live in narrow, input-specific ranges: unnormalised, the first 1x1
    convolution sees nearly constant inputs and training sits on a plateau that predicts background
    everywhere for its first few hundred steps (docs/history.md)."""
    return nn.BatchNorm2d(width) if enabled else nn.Identity()


def frozen_levels(enabled: bool, high_channels: list[int] | None) -> list[int]:
    """The channel widths of the frozen high-level levels (concatenated in ``query_high``) that a head's
    frozen relations are computed on: one entry per level when ``enabled``, else none."""
    if not enabled:
        return []
    if not high_channels:
        raise ValueError("frozen_relations needs the channel widths of the backbone's high levels")
    return list(high_channels)


def shot_prototype(features: Tensor, fraction: Tensor) -> Tensor:
    """Masked average over cells and shots, shots weighted by their area, so that an empty shot does not
    pull the prototype towards zero: (B, K, C, h, w), (B, K, 1, h, w) -> (B, C)."""
    b, k, c = features.shape[:3]
    area = fraction.sum(dim=(3, 4))  # (B, K, 1)
    per_shot = masked_average_pool(features.flatten(0, 1), fraction.flatten(0, 1)).view(b, k, c)
    return (per_shot * area).sum(dim=1) / area.sum(dim=1).clamp_min(1e-6)


def group_cosine(features: Tensor, prototype: Tensor, groups: int) -> Tensor:
    """Cosine similarity per channel group: (B, C, h, w), (B, C) -> (B, G, h, w)."""
    b, c, h, w = features.shape
    x = F.normalize(features.view(b, groups, c // groups, h, w), dim=2)
    p = F.normalize(prototype.view(b, groups, c // groups), dim=2)
    return torch.einsum("bgchw,bgc->bghw", x, p)


def support_attention(
    q: Tensor, key: Tensor, fg: Tensor, bg: Tensor, temperature: float, extra: Tensor | None = None
) -> Tensor:
    """Cosine attention of every query cell to the labelled support cells, applied to each support cell's
    foreground and background share (and ``extra`` values): q (B, H, hw, d), key (B, H, n, d) (unit
    vectors), fg/bg (B, n), extra (B, n, C) -> (B, H, hw, 2 [+ C]): channel 0 (1) is the share of a query
    cell's attention that lands on support foreground (background). Fused attention: the (hw, n) map is
    never stored."""
    b, heads, _, d = q.shape
    n = fg.shape[1]
    values = [fg.view(b, n, 1), bg.view(b, n, 1)] + ([extra] if extra is not None else [])
    v = torch.cat(values, dim=2).unsqueeze(1).expand(b, heads, n, -1)
    # cells that are mostly "ignore" carry no label: they are not attended to
    labelled = (fg + bg).view(b, 1, 1, n) > 0.5
    bias = torch.zeros(labelled.shape, dtype=q.dtype, device=q.device).masked_fill(~labelled, -1e4)
    # PyTorch's fused (flash) kernels need one width for queries, keys and values; zero padding changes
    # neither the scores nor the values kept
    width = max(d, v.shape[3])
    kept = v.shape[3]
    q, key, v = (F.pad(t, (0, width - t.shape[3])).contiguous() for t in (q, key, v))
    out = F.scaled_dot_product_attention(q, key, v, attn_mask=bias, scale=1.0 / temperature)
    return out[..., :kept]


def shot_attention(
    q: Tensor,
    key: Tensor,
    fg: Tensor,
    bg: Tensor,
    temperature: float,
    pooling: str,
    extra: Tensor | None = None,
) -> Tensor:
    """:func:`support_attention` over K supports: q (B, H, hw, d), key (B, H, K, n, d), fg/bg (B, K, n),
    extra (B, K, n, C) -> (B, H, hw, 2 [+ C]). ``joint``: one softmax over the K * n cells of all
    supports. ``mean``: one attention per support, averaged over the supports that have a labelled cell
    (a support that is all "ignore" has no evidence to give)."""
    b, heads, k, n, d = key.shape
    if pooling == "joint" or k == 1:
        flat_extra = extra.flatten(1, 2) if extra is not None else None
        return support_attention(q, key.flatten(2, 3), fg.flatten(1), bg.flatten(1), temperature, flat_extra)
    hw = q.shape[2]
    per_shot = support_attention(
        q.unsqueeze(1).expand(b, k, heads, hw, d).flatten(0, 1),
        key.transpose(1, 2).flatten(0, 1),
        fg.flatten(0, 1),
        bg.flatten(0, 1),
        temperature,
        extra.flatten(0, 1) if extra is not None else None,
    ).view(b, k, heads, hw, -1)
    labelled = ((fg + bg) > 0.5).any(dim=2).to(per_shot.dtype)  # (B, K)
    weights = labelled / labelled.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (per_shot * weights[:, :, None, None, None]).sum(dim=1)


class ObjectExpert(nn.Module):
    """Object-level expert: "what is the target object".

    Head inputs, ``head_inputs="relations"``: the query embedding's group-wise cosine similarity to the
    support foreground and background prototypes, the PFENet prior ``Y`` and the Object Continuity
    Guidance map ``G = norm(A^t Y)``; nothing that could be computed from the query alone.
    ``head_inputs="features"``: the query embedding, the tiled foreground prototype, their cosine map,
    ``Y`` and ``G`` (PFENet's layout).
    """

    def __init__(
        self,
        channels: int,
        cfg: ObjectExpertConfig,
        dropout: float = 0.1,
        inputs: str = "relations",
        high_channels: list[int] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.inputs = inputs
        self.embed = conv_relu(channels, channels, 1)
        maps = int(cfg.use_prior) + int(cfg.use_prior and cfg.ocg.enabled)
        # one pair of prototype similarity maps per frozen high-level level
        self.high_channels = frozen_levels(cfg.frozen_relations and inputs == "relations", high_channels)
        maps += 2 * len(self.high_channels)
        width = 2 * cfg.groups + maps if inputs == "relations" else 2 * channels + 1 + maps
        self.input_norm = input_norm(width, cfg.input_norm and inputs == "relations")
        self.merge = nn.Sequential(conv_relu(width, channels, 1), nn.Dropout2d(dropout))
        self.context = ContextPyramid(channels, cfg.aspp_rates)
        self.refine = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.classifier = Classifier(channels, dropout)

    def forward(
        self,
        fq: Tensor,
        fs: Tensor,
        support_fg: Tensor,
        support_bg: Tensor,
        query_high: Tensor,
        support_high: Tensor,
    ) -> dict[str, Tensor]:
        b, k, c, h, w = fs.shape
        eq = self.embed(fq)  # (B, C, h, w)
        es = self.embed(fs.flatten(0, 1)).view(b, k, c, h, w)
        prototype = shot_prototype(es, support_fg)  # (B, C)
        if self.inputs == "relations":
            background = shot_prototype(es, support_bg)
            groups = self.cfg.groups
            inputs = [group_cosine(eq, prototype, groups), group_cosine(eq, background, groups)]
            if self.high_channels:
                inputs.append(self.frozen_similarities(query_high, support_high, support_fg, support_bg))
        else:
            proto_map = prototype[:, :, None, None].expand(-1, -1, h, w)
            inputs = [eq, proto_map, F.cosine_similarity(eq, proto_map, dim=1).unsqueeze(1)]
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
        x = self.merge(self.input_norm(torch.cat(inputs, dim=1)))
        x = self.refine(self.context(x))
        return {
            "logits": self.classifier(x),
            "query_embedding": eq,
            "support_embedding": es,
            "prototype": prototype,
            **maps,
        }

    def frozen_similarities(
        self, query_high: Tensor, support_high: Tensor, support_fg: Tensor, support_bg: Tensor
    ) -> Tensor:
        """Cosine similarity of the frozen query features to the support's fg and bg prototypes, level by
        level: (B, Ch, h, w), (B, K, Ch, h, w) -> (B, 2 * levels, h, w), fg maps first."""
        maps = []
        for frac in (support_fg, support_bg):
            prototype = shot_prototype(support_high, frac)  # (B, Ch)
            per_level = zip(
                query_high.split(self.high_channels, 1), prototype.split(self.high_channels, 1), strict=True
            )
            maps += [F.cosine_similarity(q, p[:, :, None, None], dim=1) for q, p in per_level]
        return torch.stack(maps, dim=1)


class ScenarioExpert(nn.Module):
    """Scenario-level expert: "how does this whole scene relate to the support scene".

    Scenario Normalization standardises each image by its own scene statistics; dense cross-attention
    from every query pixel to every support pixel (foreground and background) then gives foreground and
    background evidence maps: the share of a query pixel's attention that lands on support foreground and
    on support background (K > 1: over all supports at once, or per support and averaged;
    ``cfg.shot_pooling``). ``head_inputs="relations"``: one pair of maps per attention head, and nothing
    else. ``head_inputs="features"``: one head, plus the normalised query and the attended support context.
    """

    def __init__(
        self,
        channels: int,
        cfg: ScenarioExpertConfig,
        dropout: float = 0.1,
        inputs: str = "relations",
        high_channels: list[int] | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.inputs = inputs
        self.heads = cfg.heads if inputs == "relations" else 1
        d = cfg.attention_dim
        self.query_proj = nn.Conv2d(channels, d, 1)
        self.key_proj = nn.Conv2d(channels, d, 1)
        self.high_channels = frozen_levels(cfg.frozen_relations and inputs == "relations", high_channels)
        width = 2 * self.heads + int(cfg.gram_difference) + 2 * len(self.high_channels)
        if inputs == "features":
            self.value_proj = conv_relu(channels, channels, 1)
            width += 2 * channels
        self.input_norm = input_norm(width, cfg.input_norm and inputs == "relations")
        self.merge = nn.Sequential(conv_relu(width, channels, 1), nn.Dropout2d(dropout))
        self.refine = nn.Sequential(
            ResidualBlock(channels, 1), ResidualBlock(channels, 2), ResidualBlock(channels, 4)
        )
        self.classifier = Classifier(channels, dropout)

    def frozen_evidence(
        self, query_high: Tensor, support_high: Tensor, support_fg: Tensor, support_bg: Tensor
    ) -> Tensor:
        """Evidence maps of attention on the frozen high-level features, one head per level, after the same
        Scenario Normalization as the trained features: -> (B, 2 * levels, h, w), fg maps first."""
        b, k, _, h, w = support_high.shape
        fg_maps, bg_maps = [], []
        fg = support_fg.reshape(b, k, h * w)
        bg = support_bg.reshape(b, k, h * w)
        levels = zip(
            query_high.split(self.high_channels, 1), support_high.split(self.high_channels, 2), strict=True
        )
        for fq, fs in levels:
            qn, sn = self.normalize(fq, fs)
            q = F.normalize(qn.flatten(2), dim=1).transpose(1, 2).unsqueeze(1)  # (B, 1, hw, c)
            key = F.normalize(sn.flatten(3), dim=2).transpose(2, 3).unsqueeze(1)  # (B, 1, K, hw, c)
            out = shot_attention(q, key, fg, bg, self.cfg.temperature, self.cfg.shot_pooling)
            fg_maps.append(out[:, 0, :, 0].view(b, h, w))
            bg_maps.append(out[:, 0, :, 1].view(b, h, w))
        return torch.stack(fg_maps + bg_maps, dim=1)

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

    def forward(
        self,
        fq: Tensor,
        fs: Tensor,
        support_fg: Tensor,
        support_bg: Tensor,
        query_high: Tensor | None = None,
        support_high: Tensor | None = None,
    ) -> dict[str, Tensor]:
        b, k, c, h, w = fs.shape
        n = self.heads
        qn, sn = self.normalize(fq, fs)
        q = F.normalize(self.query_proj(qn).view(b, n, -1, h * w), dim=2)  # (B, H, d/H, hw)
        s_flat = sn.flatten(0, 1)
        key = self.key_proj(s_flat).view(b, k, n, -1, h * w)
        key = F.normalize(key, dim=3).permute(0, 2, 1, 4, 3)  # (B, H, K, hw, d/H)
        extra = None
        if self.inputs == "features":  # the attended projected support features give a context map
            extra = self.value_proj(s_flat).view(b, k, c, h * w).transpose(2, 3)  # (B, K, hw, C)
        q = q.transpose(2, 3)
        fg, bg = support_fg.reshape(b, k, h * w), support_bg.reshape(b, k, h * w)
        out = shot_attention(q, key, fg, bg, self.cfg.temperature, self.cfg.shot_pooling, extra)
        # out: (B, H, hw, 2 [+ C])
        fg_evidence = out[..., 0].view(b, n, h, w)
        bg_evidence = out[..., 1].view(b, n, h, w)
        inputs = [fg_evidence, bg_evidence]
        if self.inputs == "features":
            context = out[:, 0, :, 2 : 2 + c].transpose(1, 2).reshape(b, c, h, w)
            inputs = [qn, context, *inputs]
        if self.cfg.gram_difference:
            inputs.append(gram_difference(fq, fs).view(b, 1, 1, 1).expand(b, 1, h, w))
        if self.high_channels:
            with torch.no_grad():  # nothing to train before the head
                inputs.append(self.frozen_evidence(query_high, support_high, support_fg, support_bg))
        x = self.refine(self.merge(self.input_norm(torch.cat(inputs, dim=1))))
        return {"logits": self.classifier(x), "evidence": fg_evidence.mean(dim=1, keepdim=True)}
