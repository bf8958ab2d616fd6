"""HDMNet as a peer method in this harness (``model.method: hdmnet``).

Written for this project from the description of Peng, Tian, Wu, Wang, Liu, Su, Jia, *Hierarchical Dense
Correlation Distillation for Few-Shot Segmentation*, CVPR 2023, with the sizes of its released model
(widths, heads, reduction ratios, the matching temperature) taken as facts. Four parts:

- **hierarchical dense features**: query and support maps pass, separately and with shared weights,
  through stages of SegFormer-style transformer layers (self-attention whose keys and values come from a
  spatially reduced grid, then a feed-forward block with a depthwise 3x3 convolution); each stage after
  the first halves the grid with a strided 3x3 convolution. There is no cross-attention between query
  and support inside a stage;
- **the matching module**, one per stage: query cells attend to the support cells under the support mask
  (cosine similarity over a temperature; the attention of each support cell is normalised over the query
  cells, and support background cells carry no weight), the attended support features are added to the
  query and refined, then merged with the training-free prior mask. Its output is the query map of the
  next stage (the cascade);
- **correlation maps** (per stage, the mean over heads of the similarity of each query cell to the
  support's foreground cells) and their **distillation**: the coarsest map learns the query's ground
  truth, each finer map the next coarser one (detached, upsampled), by a KL divergence between their
  softmax distributions over the grid (:func:`correlation_distillation`; weight ``loss.correlation_kl``);
- **the decoder**, coarse to fine, adding each stage's matched map to the upsampled coarser result, then a
  classifier on the finest grid.

HDMNet's released model also carries BAM's frozen base learner and Gram-matrix ensemble; this row leaves
it out (BAM's ensemble is measured in the ``bam`` row). What else differs from the paper is listed in
docs/method.md ("Peers in the same harness: HDMNet").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.config import HDMNetConfig
from dedn.models.experts import Classifier, conv_relu
from dedn.models.ops import area_pool, masked_cosine_prior
from dedn.models.pfenet import _resize, mean_prototype


def _tokens(x: Tensor) -> Tensor:
    """(N, C, h, w) -> (N, h*w, C)."""
    return x.flatten(2).transpose(1, 2)


def _grid(t: Tensor, h: int, w: int) -> Tensor:
    """(N, h*w, C) -> (N, C, h, w)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)


class ReducedSelfAttention(nn.Module):
    """Multi-head self-attention on (N, L, C) tokens of an h x w grid; keys and values come from the grid
    reduced by a ``reduction`` x ``reduction`` strided convolution (SegFormer's efficient attention)."""

    def __init__(self, channels: int, heads: int, reduction: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(channels, channels)
        self.key_value = nn.Linear(channels, 2 * channels)
        self.project = nn.Linear(channels, channels)
        self.reduce = nn.Conv2d(channels, channels, reduction, stride=reduction) if reduction > 1 else None
        self.norm = nn.LayerNorm(channels) if reduction > 1 else None

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        n, length, c = x.shape
        d = c // self.heads
        source = x
        if self.reduce is not None and min(h, w) >= self.reduce.stride[0]:
            source = self.norm(_tokens(self.reduce(_grid(x, h, w))))
        q = self.query(x).view(n, length, self.heads, d).transpose(1, 2)  # (N, H, L, d)
        k, v = self.key_value(source).view(n, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * d**-0.5).softmax(dim=-1)
        return self.project((attn @ v).transpose(1, 2).reshape(n, length, c))


class MixFeedForward(nn.Module):
    """Linear -> depthwise 3x3 convolution on the grid -> GELU -> linear (SegFormer's Mix-FFN)."""

    def __init__(self, channels: int, ratio: int):
        super().__init__()
        hidden = channels * ratio
        self.expand = nn.Linear(channels, hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.shrink = nn.Linear(hidden, channels)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = _tokens(self.depthwise(_grid(self.expand(x), h, w)))
        return self.shrink(F.gelu(x))


class TransformerLayer(nn.Module):
    """Pre-norm self-attention and feed-forward blocks, each with a skip connection."""

    def __init__(self, channels: int, heads: int, reduction: int, ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attention = ReducedSelfAttention(channels, heads, reduction)
        self.norm2 = nn.LayerNorm(channels)
        self.feed_forward = MixFeedForward(channels, ratio)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.attention(self.norm1(x), h, w)
        return x + self.feed_forward(self.norm2(x), h, w)


class Stage(nn.Module):
    """A patch embedding (1x1 at the first stage, a stride-2 3x3 convolution after it), transformer layers,
    a final layer norm: (N, C, h, w) -> (N, C, h', w')."""

    def __init__(self, channels: int, heads: int, reduction: int, layers: int, ratio: int, first: bool):
        super().__init__()
        self.embed = nn.Conv2d(channels, channels, 1) if first else nn.Conv2d(channels, channels, 3, 2, 1)
        self.embed_norm = nn.LayerNorm(channels)
        self.layers = nn.ModuleList(
            [TransformerLayer(channels, heads, reduction, ratio) for _ in range(layers)]
        )
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        h, w = x.shape[-2:]
        t = self.embed_norm(_tokens(x))
        for layer in self.layers:
            t = layer(t, h, w)
        return _grid(self.norm(t), h, w)


def masked_correlation(scores: Tensor, support_fg: Tensor) -> Tensor:
    """A correlation map: each query cell's mean score against the support's foreground cells, weighted by
    their foreground fraction, then the mean over heads. scores (B, H, Lq, Ls); support_fg (B, Ls) in
    [0, 1] -> (B, Lq). A support without foreground gives 0."""
    weight = support_fg[:, None, None, :]
    per_head = (scores * weight).sum(dim=-1) / weight.sum(dim=-1).clamp_min(1e-6)
    return per_head.mean(dim=1)


class Matching(nn.Module):
    """HDMNet's matching module on one stage.

    Scores are cosine similarities of the projected query and support cells over ``temperature``; the
    attention of each support cell is a softmax over the query cells, and it is weighted by that support
    cell's foreground fraction (background cells give nothing). The attended support values, projected,
    are added to the query tokens, then a feed-forward block; the result is merged with the prior mask by a
    3x3 convolution. Returns the matched (B, C, h, w) map and the (B, h, w) correlation map."""

    def __init__(self, channels: int, heads: int, temperature: float, ratio: int):
        super().__init__()
        self.heads, self.temperature = heads, temperature
        self.norm_query = nn.LayerNorm(channels)
        self.norm_support = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.project = nn.Linear(channels, channels)
        self.norm_out = nn.LayerNorm(channels)
        self.feed_forward = MixFeedForward(channels, ratio)
        self.merge = conv_relu(channels + 1, channels, 3)

    def forward(self, query: Tensor, support: Tensor, support_fg: Tensor, prior: Tensor):
        """query (B, C, h, w); support (B, K, C, hs, ws); support_fg (B, K, 1, hs, ws) fractions;
        prior (B, 1, h0, w0) at any size."""
        b, c, h, w = query.shape
        d = c // self.heads
        q_tokens = _tokens(query)  # (B, Lq, C)
        s_tokens = support.permute(0, 1, 3, 4, 2).reshape(b, -1, c)  # (B, K*hs*ws, C): every shot's cells
        fg = support_fg.reshape(b, -1)  # (B, K*hs*ws), the same order
        s_norm = self.norm_support(s_tokens)
        q = F.normalize(self.query(self.norm_query(q_tokens)).view(b, -1, self.heads, d), dim=-1)
        k = F.normalize(self.key(s_norm).view(b, -1, self.heads, d), dim=-1)
        v = self.value(s_norm).view(b, -1, self.heads, d).transpose(1, 2)  # (B, H, Ls, d)
        scores = torch.einsum("bqhd,bshd->bhqs", q, k) / self.temperature  # (B, H, Lq, Ls)
        attn = scores.softmax(dim=-2) * fg[:, None, None, :]
        matched = (attn @ v).transpose(1, 2).reshape(b, -1, c)
        t = q_tokens + self.project(matched)
        t = t + self.feed_forward(self.norm_out(t), h, w)
        x = self.merge(torch.cat([_grid(t, h, w), _resize(prior, (h, w))], dim=1))
        return x, masked_correlation(scores, fg).view(b, h, w)


def _parse(channels: int) -> nn.Sequential:
    return nn.Sequential(
        conv_relu(channels, channels, 1), conv_relu(channels, channels, 3), conv_relu(channels, channels, 1)
    )


class HDMNetHead(nn.Module):
    """Input projection (query: reduced features, prototype, prior; support: reduced features, prototype),
    the stages and matching modules, the coarse-to-fine decoder and the classifier."""

    def __init__(self, channels: int, cfg: HDMNetConfig, dropout: float = 0.1):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.heads)
        self.query_in = conv_relu(2 * channels + 1, channels, 1)
        self.support_in = conv_relu(2 * channels, channels, 1)
        self.stages = nn.ModuleList(
            [
                Stage(channels, cfg.heads[i], cfg.reductions[i], cfg.layers, cfg.mlp_ratio, first=i == 0)
                for i in range(n)
            ]
        )
        self.matching = nn.ModuleList(
            [Matching(channels, cfg.heads[i], cfg.temperature, cfg.mlp_ratio) for i in range(n)]
        )
        self.parse = nn.ModuleList([_parse(channels) for _ in range(n)])
        self.classifier = Classifier(channels, dropout)

    def forward(
        self, fq: Tensor, fs: Tensor, support_fg: Tensor, query_high: Tensor, support_high: Tensor
    ) -> dict:
        """fq (B, C, h, w) and fs (B, K, C, h, w) reduced features; support_fg (B, K, 1, h, w); the frozen
        high-level maps for the prior. Returns the logits on the grid, the correlation maps (finest first)
        and the prior."""
        b, k, c, h, w = fs.shape
        prototype = mean_prototype(fs, support_fg)  # (B, C)
        with torch.no_grad():  # frozen features only
            prior = masked_cosine_prior(query_high, support_high, support_fg)  # (B, 1, h, w)
        tiled = prototype[:, :, None, None]
        x = self.query_in(torch.cat([fq, tiled.expand(-1, -1, h, w), prior], dim=1))
        s = self.support_in(
            torch.cat([fs.flatten(0, 1), tiled.repeat_interleave(k, 0).expand(-1, -1, h, w)], 1)
        )
        fg = support_fg.flatten(0, 1)  # (B*K, 1, h, w)
        matched, correlations = [], []
        for stage, matching in zip(self.stages, self.matching, strict=True):
            x, s = stage(x), stage(s)  # shared weights, query and supports apart
            hs, ws = s.shape[-2:]
            stage_fg = area_pool(fg, (hs, ws)).view(b, k, 1, hs, ws)
            x, corr = matching(x, s.view(b, k, c, hs, ws), stage_fg, prior)
            matched.append(x)
            correlations.append(corr)
        y = self.parse[-1](matched[-1])
        for i in range(len(matched) - 2, -1, -1):  # coarse to fine
            up = _resize(y, matched[i].shape[-2:])
            y = up + self.parse[i](matched[i] + up)
        logits = self.classifier(y)
        if tuple(logits.shape[-2:]) != (h, w):
            logits = _resize(logits, (h, w))
        return {"logits": logits, "correlations": correlations, "prior": prior, "prototype": prototype}


def correlation_distillation(correlations: list[Tensor], target: Tensor) -> Tensor:
    """HDMNet's correlation distillation: the mean over stages of ``KL(teacher || student)`` between
    softmax distributions over each stage's grid.

    ``correlations``: (B, h_i, w_i) maps, finest first. The coarsest map's teacher is the query's
    foreground (its fraction per cell, normalised to sum 1: uniform over a fully covered object); every
    finer map's teacher is the next coarser map, detached and bilinearly upsampled to its grid, through a
    softmax. ``target`` (B, H, W) in {0, 1, ignore}. Episodes whose query has no foreground pixel are left
    out of the coarsest term (there is nothing to point at); the other terms keep every episode."""
    coarsest = correlations[-1]
    b, h, w = coarsest.shape
    fg = area_pool((target == 1).float().unsqueeze(1), (h, w)).flatten(1)  # (B, h*w)
    mass = fg.sum(dim=1)
    has_fg = mass > 0
    terms = []
    log_student = coarsest.flatten(1).log_softmax(dim=1)
    if has_fg.any():
        teacher = fg[has_fg] / mass[has_fg, None]
        kl = (torch.xlogy(teacher, teacher) - teacher * log_student[has_fg]).sum(dim=1)
        terms.append(kl.mean())
    else:
        terms.append(coarsest.sum() * 0.0)
    for i in range(len(correlations) - 2, -1, -1):
        student = correlations[i]
        up = F.interpolate(
            correlations[i + 1].detach().unsqueeze(1),
            student.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        log_teacher = up.flatten(1).log_softmax(dim=1)
        log_s = student.flatten(1).log_softmax(dim=1)
        terms.append((log_teacher.exp() * (log_teacher - log_s)).sum(dim=1).mean())
    return torch.stack(terms).mean()
