"""BAM as a peer method in this harness (``model.method: bam``).

Written for this project from the paper's description: Lang, Cheng, Tu, Han, *Learning What Not to
Segment: A New Perspective on Few-Shot Segmentation*, CVPR 2022. Three parts:

- the **meta learner**: PFENet's training-free prior and masked-average prototype with the query's reduced
  features, merged by a 1x1 convolution, an ASPP and a residual pair of 3x3 convolutions, then a
  classifier (fg/bg logits);
- the **base learner**: a pyramid-pooling segmentation head over the base classes (BAM: PSPNet), trained
  first on the training images' semantic labels and then frozen (:func:`train_base_learner`); its
  probabilities of every base class summed give where the query shows *base* objects, which cannot be the
  novel target;
- the **ensemble**: the Gram-matrix difference ``psi = ||G_q - G_s||_F / C`` of query and support
  low-level features (a scene-difference score; ``G`` is the cosine similarity between channels) adjusts
  the meta learner's fg and bg probabilities through one shared 1x1 convolution, and a second 1x1
  convolution merges the adjusted background with the base learner's base-class map; the output is
  ``[merged background, adjusted foreground]``.

In training, the episode's own class is a base class: it is left out of the base-class map (BAM does
the same), so the base learner never suppresses the target. At test time the classes are novel and every
base class counts. What differs from the paper (frozen backbone, feature grid, the base learner's
training on ~1,000 images) is listed in docs/method.md ("Peers in the same harness: BAM").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.config import BAMConfig
from dedn.models.experts import Classifier, conv_relu
from dedn.models.ops import area_pool, gram_distances, masked_cosine_prior
from dedn.models.pfenet import _resize, mean_prototype


def gram_difference(query_low: Tensor, support_low: Tensor) -> Tensor:
    """BAM's scene difference of each shot: ``||G_q - G_s||_F / C``, (B, C, h, w), (B, K, C, h, w) -> (B, K).
    0 for identical scenes; at most 2 (cosines lie in [-1, 1]). ``G``: :func:`dedn.models.ops.gram_matrix`."""
    return gram_distances(query_low, support_low) / query_low.shape[1]


class BaseLearner(nn.Module):
    """Pyramid pooling over the frozen mid-level features -> logits over background + the base classes."""

    def __init__(self, in_channels: int, classes: int, width: int = 128, bins=(1, 2, 3, 6), dropout=0.1):
        super().__init__()
        self.bins = tuple(bins)
        self.reduce = conv_relu(in_channels, width, 1)
        self.pool = nn.ModuleList([conv_relu(width, width // 4, 1) for _ in self.bins])
        self.fuse = conv_relu(width + len(self.bins) * (width // 4), width, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(width, classes + 1, 1)

    def forward(self, mid: Tensor) -> Tensor:
        x = self.reduce(mid)
        size = x.shape[-2:]
        pooled = [
            _resize(conv(area_pool(x, (b, b))), size) for b, conv in zip(self.bins, self.pool, strict=True)
        ]
        return self.classifier(self.dropout(self.fuse(torch.cat([x, *pooled], dim=1))))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per dilation and the global mean,
    concatenated and reduced by a 1x1 convolution."""

    def __init__(self, channels: int, dilations: list[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_relu(channels, channels, 1)] + [conv_relu(channels, channels, 3, d) for d in dilations]
        )
        self.image = conv_relu(channels, channels, 1)
        self.project = conv_relu(channels * (len(dilations) + 2), channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        glob = self.image(x.mean(dim=(2, 3), keepdim=True)).expand_as(x)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [glob], dim=1))


class BAMHead(nn.Module):
    """Meta learner + frozen base learner + Gram-adjusted ensemble.

    ``low_channels``: how many of the first channels of the raw ``mid`` features form the low-level map
    of the Gram difference (the shallowest stored level)."""

    def __init__(self, channels: int, mid_channels: int, low_channels: int, cfg: BAMConfig, dropout: float):
        super().__init__()
        self.cfg = cfg
        self.low_channels = low_channels
        self.init_merge = conv_relu(2 * channels + 1, channels, 1)
        self.aspp = ASPP(channels, list(cfg.dilations))
        self.refine = nn.Sequential(conv_relu(channels, channels, 3), conv_relu(channels, channels, 3))
        self.classifier = Classifier(channels, dropout)
        self.base = BaseLearner(mid_channels, cfg.base_classes, dropout=dropout)
        self.base.requires_grad_(False)  # trained apart (train_base_learner), frozen in meta training
        #: the benchmark's class id of each base-learner class (1..base_classes), set by its training
        self.register_buffer("base_ids", torch.zeros(cfg.base_classes, dtype=torch.long))
        # one 1x1 conv adjusts both meta probabilities by psi, a second merges the background with the base
        # map; both start as the identity on the meta learner's probability (weights [1, 0], as BAM's)
        self.gram_merge = nn.Conv2d(2, 1, 1, bias=False)
        self.cls_merge = nn.Conv2d(2, 1, 1, bias=False)
        for conv in (self.gram_merge, self.cls_merge):
            nn.init.zeros_(conv.weight)
            with torch.no_grad():
                conv.weight[0, 0] = 1.0
        self.kshot = nn.Linear(cfg.shots, cfg.shots) if cfg.shots > 1 else None
        if self.kshot is not None:  # starts as the plain mean of the K differences
            nn.init.zeros_(self.kshot.weight)
            nn.init.zeros_(self.kshot.bias)

    def shot_difference(self, per_shot: Tensor) -> Tensor:
        """(B, K) Gram differences -> (B,): BAM's K-shot weighting (a learned softmax over the sorted
        differences) when K is ``model.bam.shots``, else their mean."""
        k = per_shot.shape[1]
        if k == 1:
            return per_shot[:, 0]
        if self.kshot is None or k != self.cfg.shots:
            return per_shot.mean(dim=1)
        ordered = per_shot.sort(dim=1).values
        return (self.kshot(ordered).softmax(dim=1) * ordered).sum(dim=1)

    def base_map(self, query_mid: Tensor, class_ids: Tensor | None) -> Tensor:
        """(B, 1, h, w): the base learner's probability of any base class, the episode's own class left
        out where it is one (``class_ids``: the benchmark's class id of each episode, training only)."""
        with torch.no_grad():
            self.base.eval()  # frozen: no dropout, whatever mode the model is in
            probs = self.base(query_mid).softmax(dim=1)[:, 1:]  # (B, N, h, w)
        if class_ids is not None:
            keep = self.base_ids.view(1, -1) != class_ids.view(-1, 1).to(self.base_ids.device)  # (B, N)
            probs = probs * keep[:, :, None, None]
        return probs.sum(dim=1, keepdim=True)

    def forward(
        self,
        fq: Tensor,
        fs: Tensor,
        support_fg: Tensor,
        query_mid: Tensor,
        support_mid: Tensor,
        query_high: Tensor,
        support_high: Tensor,
        class_ids: Tensor | None = None,
    ) -> dict:
        b, _, h, w = fq.shape
        prototype = mean_prototype(fs, support_fg)
        with torch.no_grad():  # frozen features only
            prior = masked_cosine_prior(query_high, support_high, support_fg)
            low = self.low_channels
            per_shot = gram_difference(query_mid[:, :low], support_mid[:, :, :low])  # (B, K)
        psi = self.shot_difference(per_shot)  # the K-shot weighting is learned
        tiled = prototype[:, :, None, None].expand(-1, -1, h, w)
        x = self.aspp(self.init_merge(torch.cat([fq, tiled, prior], dim=1)))
        x = x + self.refine(x)
        meta = self.classifier(x)  # (B, 2, h, w)
        p = meta.softmax(dim=1)
        psi_map = psi.view(b, 1, 1, 1).expand(b, 1, h, w)
        bg = self.gram_merge(torch.cat([p[:, :1], psi_map], dim=1))
        fg = self.gram_merge(torch.cat([p[:, 1:], psi_map], dim=1))
        base = self.base_map(query_mid, class_ids)
        final = torch.cat([self.cls_merge(torch.cat([bg, base], dim=1)), fg], dim=1)
        return {"logits": final, "meta": meta, "base": base, "gram": psi, "prior": prior}


def base_label_table(base_ids: list[int]) -> np.ndarray:
    """(256,) lookup: a label value -> its base-learner class (0 background and every other class, e.g. a
    background pseudo-class; 255 stays the ignore value)."""
    table = np.zeros(256, dtype=np.int64)
    for j, class_id in enumerate(base_ids, start=1):
        table[class_id] = j
    table[255] = 255
    return table


def train_base_learner(
    head: BAMHead,
    labels: dict[str, Tensor],
    features,
    base_ids: list[int],
    cfg: BAMConfig,
    seed: int,
    loss_size: int,
    flip: float,
    device: torch.device,
    log=None,
) -> float:
    """BAM's first stage: the base learner as a semantic segmenter of the base classes on the training
    images' frozen ``mid`` features (``features(image_id)``) and labels (S x S, 255 = ignore), then
    frozen. Batches and flips are drawn from ``seed``. Returns the last step's loss."""
    if len(base_ids) != cfg.base_classes:
        from dedn.errors import ConfigError

        raise ConfigError(
            f"model.bam.base_classes = {cfg.base_classes}, but the training benchmark has {len(base_ids)} "
            f"base classes ({', '.join(map(str, base_ids))}): set model.bam.base_classes={len(base_ids)}"
        )
    head.base_ids.copy_(torch.tensor(base_ids, dtype=torch.long))
    table = torch.from_numpy(base_label_table(base_ids))
    ids = sorted(labels)
    rng = np.random.default_rng([seed, 13])
    base = head.base
    base.requires_grad_(True)
    base.train()
    params = list(base.parameters())
    opt = torch.optim.SGD(params, lr=cfg.base_lr, momentum=0.9, weight_decay=1e-4)
    loss = torch.zeros(())
    for step in range(cfg.base_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.base_lr * (1 - step / cfg.base_steps) ** 0.9
        chosen = rng.choice(len(ids), size=min(cfg.base_batch, len(ids)), replace=False)
        flips = rng.random(len(chosen)) < flip
        mids, targets = [], []
        for i, fl in zip(chosen, flips, strict=True):
            mid = features(ids[i])["mid"]
            target = table[labels[ids[i]].clamp(0, 255)]
            if fl:
                mid, target = mid.flip(-1), target.flip(-1)
            mids.append(mid)
            targets.append(target)
        mid = torch.stack(mids).to(device)
        target = torch.stack(targets).to(device)
        target = F.interpolate(target[:, None].float(), (loss_size, loss_size), mode="nearest")[:, 0].long()
        logits = F.interpolate(base(mid), (loss_size, loss_size), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, target, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and ((step + 1) % 50 == 0 or step + 1 == cfg.base_steps):
            log({"base_step": step + 1, "loss/base": float(loss.detach())})
    base.requires_grad_(False)
    base.eval()
    return float(loss.detach())
