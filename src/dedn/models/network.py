"""DEDN and the baselines that share its code: one model class, switched by ``model.method``.

- ``dedn``: object expert + scenario expert, fused by Adaptive Weighted Fusion (or plain averaging);
- ``object`` / ``scenario``: one expert alone;
- ``proto`` / ``prior``: training-free baselines on the frozen high-level features;
- ``hsnet``: the peer method HSNet (Min et al., ICCV 2021) on the same frozen features
  (:mod:`dedn.models.hsnet`).
- ``pfenet``: a peer method, PFENet's head (prior mask + Feature Enrichment Module) on the same frozen
  features and reduction layer (dedn.models.pfenet).
- ``bam``: a peer method, BAM's meta learner, frozen base learner and Gram-adjusted ensemble
  (dedn.models.bam).
- ``hdmnet``: a peer method, HDMNet's hierarchical transformer, matching modules, correlation
  distillation and decoder on the same frozen features and reduction layer (dedn.models.hdmnet).

The frozen backbone is separated from the rest (:meth:`FewShotSegmenter.encode`), so an image's
backbone features can be computed once and reused in every episode where it appears.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.config import ModelConfig
from dedn.models.experts import ObjectExpert, ScenarioExpert
from dedn.models.fusion import FusionGate, fuse_probabilities, fusion_weights
from dedn.models.ops import (
    background_coverage,
    cosine_prior,
    fit_support_probe,
    fit_support_ridge,
    mask_fractions,
    masked_average_pool,
    soft_iou,
    soft_iou_fractions,
)
from dedn.models.pfenet import PFENetHead

TRAINING_FREE = ("proto", "prior")
#: logit margin used where the answer is fixed (an empty support: everything is background)
_FIXED_LOGIT = 20.0


def build_backbone(cfg: ModelConfig):
    from dedn.models.backbones import create_backbone

    if cfg.backbone == "toy":
        from dedn.models.toy import build_toy

        return build_toy(cfg.weights, cfg.dilate)
    return create_backbone(cfg.backbone, weights=cfg.weights, dilate=cfg.dilate)


class FewShotSegmenter(nn.Module):
    """A few-shot segmentation model: frozen backbone + the method's heads.

    Inputs are episodes: ``query`` (B, 3, H, W) in [0, 1], ``supports`` (B, K, 3, H, W) and
    ``support_masks`` (B, K, H, W) in {0, 1, 255}. Outputs are dicts with ``logits`` (B, 2, H, W)
    (for DEDN the log of the fused probability) and, for trained methods, each expert's logits.
    """

    def __init__(self, cfg: ModelConfig, backbone: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else build_backbone(cfg)
        levels = self.backbone.default_levels
        self.mid_levels = list(cfg.mid_levels or levels["mid"])
        self.high_levels = list(cfg.high_levels or levels["high"])
        info = self.backbone.feature_info
        for name in self.mid_levels + self.high_levels:
            if name not in info:
                raise ValueError(f"backbone {cfg.backbone} has no level '{name}'; it has: {', '.join(info)}")
        self.method = cfg.method
        self.expert_names: list[str] = []
        self.gate: FusionGate | None = None
        if self.method in TRAINING_FREE:
            return
        if self.method == "hsnet":
            from dedn.models.hsnet import HSNetHead

            self.hsnet_pyramid = self._hsnet_pyramid()
            self.hsnet = HSNetHead([len(level) for level in self.hsnet_pyramid], cfg.hsnet)
            return
        mid_channels = sum(info[n].channels for n in self.mid_levels)
        c = cfg.channels

        def reduction() -> nn.Module:
            return nn.Sequential(
                nn.Conv2d(mid_channels, c, 1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(cfg.dropout)
            )

        names = [e for e in ("object", "scenario") if self.method in ("dedn", e)]
        if self.method in ("pfenet", "bam", "hdmnet"):
            names = [self.method]
        # shared: one module; per_expert: one per expert, keyed by its name (created before the experts,
        # so that a seed initialises the shared layout as it always did)
        self.reduce: nn.Module = (
            reduction() if cfg.reduce == "shared" else nn.ModuleDict({name: reduction() for name in names})
        )
        self.experts = nn.ModuleDict()
        high_channels = [info[n].channels for n in self.high_levels]
        if self.method in ("dedn", "object"):
            self.experts["object"] = ObjectExpert(c, cfg.object, cfg.dropout, cfg.head_inputs, high_channels)
        if self.method in ("dedn", "scenario"):
            self.experts["scenario"] = ScenarioExpert(
                c, cfg.scenario, cfg.dropout, cfg.head_inputs, high_channels
            )
        if self.method == "pfenet":
            self.experts["pfenet"] = PFENetHead(c, cfg.pfenet, cfg.dropout)
        if self.method == "bam":
            from dedn.models.bam import BAMHead

            low = info[self.mid_levels[0]].channels  # the shallowest stored level: BAM's Gram input
            self.experts["bam"] = BAMHead(c, mid_channels, low, cfg.bam, cfg.dropout)
        if self.method == "hdmnet":
            from dedn.models.hdmnet import HDMNetHead

            self.experts["hdmnet"] = HDMNetHead(c, cfg.hdmnet, cfg.dropout)
        self.expert_names = list(self.experts)
        if self.method == "dedn" and cfg.fusion.gate:
            self.gate = FusionGate()

    def _hsnet_pyramid(self) -> list[list[str]]:
        """The backbone levels of each hypercorrelation pyramid level, shallowest first (``model.hsnet``)."""
        available = list(dict.fromkeys(self.mid_levels + self.high_levels))
        pyramid = self.cfg.hsnet.pyramid
        if pyramid is None:
            order = list(getattr(self.backbone, "_stage_names", ()))
            depth = {name: order.index(name) if name in order else len(order) for name in available}
            return [[name] for name in sorted(available, key=lambda name: depth[name])]
        for level in pyramid:
            for name in level:
                if name not in available:
                    raise ValueError(
                        f"model.hsnet.pyramid names '{name}', which the encoder does not give; it gives "
                        f"{', '.join(available)} (model.mid_levels and model.high_levels)"
                    )
        return [list(level) for level in pyramid]

    def _layer_features(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        """The encoder's concatenated ``mid`` and ``high`` maps split back into their backbone levels
        (channels along dim -3, in the order of mid_levels / high_levels). A level in both comes from
        ``mid`` (raw; ``high`` holds the same map L2-normalised per cell, which gives the same cosines)."""
        info = self.backbone.feature_info
        layers: dict[str, Tensor] = {}
        for key, names in (("high", self.high_levels), ("mid", self.mid_levels)):
            parts = torch.split(feats[key], [info[n].channels for n in names], dim=-3)
            layers.update(zip(names, parts, strict=True))
        return layers

    def _hsnet_outputs(self, query: dict, supports: dict, fg: Tensor, out_size) -> dict:
        """HSNet's logits at ``out_size`` and, under ``shot_logits``, each pass's (B, K or 1, 2, H, W)."""
        from dedn.models.hsnet import vote_logits

        q, s = self._layer_features(query), self._layer_features(supports)
        joint = self.cfg.hsnet.shot_mode == "joint"
        logits = self.hsnet(
            [[q[n] for n in level] for level in self.hsnet_pyramid],
            [[s[n] for n in level] for level in self.hsnet_pyramid],
            fg,
            joint,
        )
        b, passes = logits.shape[:2]
        up = F.interpolate(logits.flatten(0, 1), out_size, mode="bilinear", align_corners=False)
        up = up.view(b, passes, *up.shape[1:])
        if passes == 1:
            fused = up[:, 0]
        elif self.training:
            fused = up.mean(dim=1)  # the vote is not differentiable: train on the passes' mean logits
        else:
            fused = vote_logits(up)
        return {"logits": fused, "shot_logits": up}

    @property
    def fusion_members(self) -> list[str]:
        """What AWF weighs (the columns of ``fusion_weights``): the experts, and the training-free matcher
        when ``model.fusion.matcher`` names one."""
        matcher = self.cfg.fusion.matcher
        return self.expert_names + ([matcher] if self.method == "dedn" and matcher != "none" else [])

    @property
    def trainable(self) -> bool:
        return self.method not in TRAINING_FREE

    # ------------------------------------------------------------------ frozen encoder
    @torch.no_grad()
    def encode(self, images: Tensor) -> dict[str, Tensor]:
        """Frozen features of (N, 3, H, W) images: ``mid`` (N, Cm, h, w) raw, ``high`` (N, Ch, h, w)
        with each level L2-normalised over channels (pitfall 3 of BACKBONES.md: levels differ in scale)."""
        self.backbone.eval()
        feats = self.backbone(images, levels=self.mid_levels + self.high_levels)
        size = feats[self.mid_levels[0]].shape[-2:]

        def fit(x: Tensor) -> Tensor:
            return x if x.shape[-2:] == size else F.interpolate(x, size, mode="bilinear", align_corners=False)

        mid = torch.cat([fit(feats[n]) for n in self.mid_levels], dim=1)
        high = torch.cat([F.normalize(fit(feats[n]), dim=1) for n in self.high_levels], dim=1)
        return {"mid": mid, "high": high}

    def forward(
        self,
        query,
        supports,
        support_masks: Tensor,
        out_size: tuple[int, int] | None = None,
        class_ids: Tensor | None = None,
    ) -> dict:
        """Images (query (B, 3, H, W), supports (B, K, 3, H, W)) or, when ``query`` is a dict, their
        precomputed features. ``out_size``: the size of the returned logits (required for features; for
        images, default the input size). ``class_ids`` (B,): each episode's class, read only by BAM, to leave
        a base class out of its base-learner map in training and validation; never given at test time."""
        if isinstance(query, dict):
            if out_size is None:
                raise ValueError("out_size is required when the model is given features")
            return self.forward_features(query, supports, support_masks, out_size, class_ids=class_ids)
        b, k = supports.shape[:2]
        q = self.encode(query)
        s = self.encode(supports.flatten(0, 1))
        s = {name: t.view(b, k, *t.shape[1:]) for name, t in s.items()}
        return self.forward_features(
            q, s, support_masks, out_size or tuple(query.shape[-2:]), class_ids=class_ids
        )

    # ------------------------------------------------------------------ heads
    def forward_features(
        self,
        query: dict[str, Tensor],
        supports: dict[str, Tensor],
        support_masks: Tensor,
        out_size: tuple[int, int],
        support_scores: Tensor | None = None,
        class_ids: Tensor | None = None,
        probe: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """The model on precomputed features: ``query`` values (B, C, h, w), ``supports`` (B, K, C, h, w).

        ``support_scores``: AWF's (B, E) scores of these very supports from an earlier call
        (``out["support_scores"]``), to skip their pass: they do not depend on the query, and an episode's
        support set recurs across the episodes of an evaluation. ``probe``: likewise the `probe` matcher's
        fit to these supports (``out["probe"]``), so that it is fitted once per support set."""
        b = support_masks.shape[0]
        fg, bg = self._support_fractions(support_masks, query["mid"].shape[-2:])
        if self.method == "proto":
            out = {"logits": self._proto_logits(query["high"], supports["high"], fg, bg)}
        elif self.method == "prior":
            prior = cosine_prior(query["high"], supports["high"], fg)
            thr = self.cfg.baseline.prior_threshold
            out = {"logits": torch.cat([torch.full_like(prior, thr), prior], dim=1) * 10.0, "prior": prior}
        elif self.method == "hsnet":
            out = self._hsnet_outputs(query, supports, fg, out_size)  # at out_size: _upsample keeps it
        else:
            out = self._expert_outputs(query, supports, fg, bg, class_ids=class_ids)
        grid_logits = dict(out.get("experts", {}))
        if self.gate is not None:
            gated, gate_map = self.gate([grid_logits[e] for e in self.expert_names], out_size)
            out["gate_probability"] = gated
        out = self._upsample(out, out_size)
        if self.method == "dedn":
            mode = self.cfg.fusion.train_mode if self.training else self.cfg.fusion.mode
            # fusion on the feature grid (model.fusion.resolution = grid): a test-time setting
            on_grid = self._fuses_on_grid(mode)
            members = [(grid_logits if on_grid else out["experts"])[e] for e in self.expert_names]
            if mode == "awf" and len(self.fusion_members) > len(self.expert_names):
                if self.cfg.fusion.matcher == "probe":
                    probe = probe if probe is not None else self.fit_probe(supports["high"], fg, bg)
                    out["probe"] = probe
                matcher = self._matcher_logits(query, supports, fg, bg, probe)
                out["matcher"] = {
                    self.cfg.fusion.matcher: self._upsample({"logits": matcher}, out_size)["logits"]
                }
                members.append(matcher if on_grid else out["matcher"][self.cfg.fusion.matcher])
                cover = self._matcher_cover(query, supports, bg, None if on_grid else out_size)
                if cover is not None:
                    out["matcher_cover"] = cover
            probs = [x.softmax(dim=1) for x in members]
            if mode == "gate":
                if self.gate is None:
                    raise ValueError("model.fusion.mode = gate needs a model trained with model.fusion.gate")
                w = gate_map.mean(dim=(1, 2, 3))
                weights = torch.stack([w, 1 - w], dim=1)  # the mean per-pixel weights, for reports
                fused = gated
            elif mode in ("awf", "cycle"):
                if mode == "awf":
                    scores = (
                        support_scores
                        if support_scores is not None
                        else self.support_scores(supports, support_masks, out_size)  # (B, E)
                    )
                else:
                    scores = self.cycle_scores(query, supports, support_masks, grid_logits, out_size)
                weights = fusion_weights(scores, self.cfg.fusion.temperature)
                out["support_scores"] = scores
            else:
                weights = torch.full((b, len(probs)), 1.0 / len(probs), device=probs[0].device)
            if mode != "gate":
                confidence = self.cfg.fusion.confidence and mode in ("awf", "cycle")
                pixel = None
                if "matcher_cover" in out:  # the matcher is the last member
                    pixel = [None] * (len(probs) - 1) + [out["matcher_cover"]]
                fused = fuse_probabilities(probs, weights, confidence, pixel)
                if on_grid:  # the fused probability is what is upsampled, as the members' logits are
                    fused = F.interpolate(fused, out_size, mode="bilinear", align_corners=False)
            out["fusion_weights"] = weights
            out["probability"] = fused
            out["logits"] = fused.clamp_min(1e-6).log()
        elif self.method in ("object", "scenario", "pfenet", "bam", "hdmnet"):
            out["logits"] = out["experts"][self.method]
        # An episode whose supports have no foreground pixel has nothing to find: predict background.
        empty = (support_masks == 1).flatten(1).sum(dim=1) == 0
        if empty.any():
            fixed = torch.zeros_like(out["logits"])
            fixed[:, 0] = _FIXED_LOGIT
            out["logits"] = torch.where(empty.view(b, 1, 1, 1), fixed, out["logits"])
        out["empty_support"] = empty
        return out

    def _matcher_cover(self, query: dict, supports: dict, bg: Tensor, out_size) -> Tensor | None:
        """The `probe` member's per-cell weight factor (``model.fusion.probe.coverage``): (B, 1, h, w) at
        the grid, or upsampled to ``out_size``; None when off."""
        cover = self.cfg.fusion.probe.coverage
        if cover is None or self.cfg.fusion.matcher != "probe":
            return None
        lo, hi = cover
        g = ((background_coverage(query["high"], supports["high"], bg) - lo) / (hi - lo)).clamp(0.0, 1.0)
        if out_size is not None:
            g = F.interpolate(g, out_size, mode="bilinear", align_corners=False)
        return g

    def _fuses_on_grid(self, mode: str) -> bool:
        """Whether the fusion (and AWF's support scores) run on the feature grid: at test time, with
        ``model.fusion.resolution = grid``, for the fusions that weigh the members' probabilities."""
        fusion = self.cfg.fusion
        return not self.training and fusion.resolution == "grid" and mode in ("awf", "cycle", "mean")

    @staticmethod
    def _support_fractions(support_masks: Tensor, size) -> tuple[Tensor, Tensor]:
        """Foreground/background fraction of each feature cell of each shot: two (B, K, 1, h, w)."""
        b, k = support_masks.shape[:2]
        h, w = size
        fg, bg = mask_fractions(support_masks.flatten(0, 1), (h, w))
        return fg.view(b, k, 1, h, w), bg.view(b, k, 1, h, w)

    def _expert_outputs(self, query, supports, fg, bg, only: str | None = None, class_ids=None) -> dict:
        """Each expert's logits at the feature grid (``only``: that expert alone)."""
        b, k = fg.shape[:2]
        reduced: dict[nn.Module, tuple[Tensor, Tensor]] = {}

        def features(expert: str) -> tuple[Tensor, Tensor]:
            """The reduced query (B, C, h, w) and support (B, K, C, h, w) features that ``expert`` sees."""
            layer = self.reduce if isinstance(self.reduce, nn.Sequential) else self.reduce[expert]
            if layer not in reduced:
                fq = layer(query["mid"])  # query first: the order in which dropout draws its masks
                fs = layer(supports["mid"].flatten(0, 1))
                reduced[layer] = (fq, fs.view(b, k, *fs.shape[1:]))
            return reduced[layer]

        out: dict = {"experts": {}, "aux": {"support_fg": fg, "support_bg": bg}}
        if "object" in self.experts and only in (None, "object"):
            fq, fs = features("object")
            o = self.experts["object"](fq, fs, fg, bg, query["high"], supports["high"])
            out["experts"]["object"] = o["logits"]
            out["aux"].update({key: v for key, v in o.items() if key != "logits"})
        if "scenario" in self.experts and only in (None, "scenario"):
            fq, fs = features("scenario")
            s = self.experts["scenario"](fq, fs, fg, bg, query["high"], supports["high"])
            out["experts"]["scenario"] = s["logits"]
            out["aux"]["evidence"] = s["evidence"]
        if "pfenet" in self.experts and only in (None, "pfenet"):
            fq, fs = features("pfenet")
            p = self.experts["pfenet"](fq, fs, fg, query["high"], supports["high"])
            out["experts"]["pfenet"] = p["logits"]
            # the per-scale logits of the FEM at their own sizes (the loss upsamples them)
            out["intermediate"] = p["intermediate"]
            out["aux"].update(prior=p["prior"], prototype=p["prototype"])
        if "bam" in self.experts and only in (None, "bam"):
            fq, fs = features("bam")
            args = (query["mid"], supports["mid"], query["high"], supports["high"])
            p = self.experts["bam"](fq, fs, fg, *args, class_ids=class_ids)
            out["experts"]["bam"] = p["logits"]
            out["intermediate"] = [p["meta"]]  # the meta learner's own loss (BAM's auxiliary term)
            out["aux"].update(prior=p["prior"], base=p["base"], gram=p["gram"])
        if "hdmnet" in self.experts and only in (None, "hdmnet"):
            fq, fs = features("hdmnet")
            p = self.experts["hdmnet"](fq, fs, fg, query["high"], supports["high"])
            out["experts"]["hdmnet"] = p["logits"]
            # each stage's correlation map, finest first (the loss distils them: loss.correlation_kl)
            out["aux"].update(prior=p["prior"], correlations=p["correlations"])
        return out

    @staticmethod
    def _upsample(out: dict, size: tuple[int, int]) -> dict:
        def up(x: Tensor) -> Tensor:
            return F.interpolate(x, size, mode="bilinear", align_corners=False)

        if "logits" in out:
            out["logits"] = up(out["logits"])
        if "experts" in out:
            out["experts"] = {name: up(x) for name, x in out["experts"].items()}
        return out

    def support_scores(self, supports: dict[str, Tensor], support_masks: Tensor, out_size) -> Tensor:
        """Soft IoU of each fusion member on the support set: (B, E), the mean of :meth:`shot_scores`."""
        return self.shot_scores(supports, support_masks, out_size).mean(dim=1)

    def shot_scores(self, supports: dict[str, Tensor], support_masks: Tensor, out_size) -> Tensor:
        """IoU of each fusion member on each shot: (B, K, E); soft or of its decision
        (``model.fusion.score``).

        K = 1, or ``model.fusion.support_pass = self``: shot k is fed as its own query, with itself as the
        only support. Otherwise leave-one-out: shot k is the query and the other K - 1 shots are its
        supports. Reuses the support features already computed. The soft IoU is taken at ``out_size``
        against the mask, or with ``model.fusion.resolution = grid`` on the feature grid against the
        shot's mask fractions (:func:`soft_iou_fractions`).
        """
        # The weights are a per-episode estimate, not a training signal: no gradient, no activations kept.
        with torch.no_grad():
            return self._shot_scores(supports, support_masks, out_size)

    def _shot_scores(self, supports: dict[str, Tensor], support_masks: Tensor, out_size) -> Tensor:
        k = support_masks.shape[1]
        alone = k == 1 or self.cfg.fusion.support_pass == "self"
        on_grid = self._fuses_on_grid("awf")
        per_shot = []
        # one pseudo-episode per shot, run shot by shot: all K at once would multiply the memory of the
        # dense matching by K (tens of GB for ResNet features at 5 shots)
        for i in range(k):
            pseudo_query = {n: t[:, i] for n, t in supports.items()}  # (B, C, h, w)
            if alone:
                pseudo_supports = {n: t[:, i : i + 1] for n, t in supports.items()}  # (B, 1, C, h, w)
                pseudo_masks = support_masks[:, i : i + 1]
            else:
                rest = torch.tensor([j for j in range(k) if j != i], device=support_masks.device)
                pseudo_supports = {n: t[:, rest] for n, t in supports.items()}  # (B, K - 1, C, h, w)
                pseudo_masks = support_masks[:, rest]
            # the members only: no fusion and no empty-support override are needed for the scores
            grid = pseudo_query["mid"].shape[-2:]
            fg, bg = self._support_fractions(pseudo_masks, grid)
            out = self._expert_outputs(pseudo_query, pseudo_supports, fg, bg)
            if len(self.fusion_members) > len(self.expert_names):
                out["experts"]["matcher"] = self._matcher_logits(pseudo_query, pseudo_supports, fg, bg)
            if on_grid:  # against the shot's own mask fractions on the grid
                own = (fg, bg) if alone else self._support_fractions(support_masks[:, i : i + 1], grid)
                shot_fg, shot_bg = (x[:, 0, 0] for x in own)
                scores = [
                    soft_iou_fractions(self._scored(x), shot_fg, shot_bg) for x in out["experts"].values()
                ]
            else:
                out = self._upsample(out, out_size)
                target = _resized(support_masks[:, i], out_size)
                scores = [soft_iou(self._scored(x), target) for x in out["experts"].values()]
            per_shot.append(torch.stack(scores, 1))
        return torch.stack(per_shot, dim=1)  # (B, K, E)

    def _scored(self, logits: Tensor) -> Tensor:
        """A member's (B, 2, h, w) logits -> what AWF scores against the shot's mask (``fusion.score``):
        its foreground probability (soft) or its decision, 1 where the probability is above 0.5 (hard;
        ties go to background, as in the prediction)."""
        if self.cfg.fusion.score == "hard":
            return (logits[:, 1] > logits[:, 0]).to(logits.dtype)
        return logits.softmax(dim=1)[:, 1]

    @torch.no_grad()
    def cycle_scores(
        self, query: dict, supports: dict, support_masks: Tensor, grid_logits: dict, out_size
    ) -> Tensor:
        """How well each expert's query prediction serves as a support to find the support's object again:
        (B, E). Expert ``e``'s soft query mask becomes a one-shot support (its foreground probability per
        cell); ``e`` then segments every support image from it, scored by soft IoU against the true support
        mask and averaged over shots. Unlike :meth:`support_scores`, this depends on the query, so it can
        tell which expert got the query right. No query label is used."""
        k = support_masks.shape[1]
        pseudo_supports = {n: t.unsqueeze(1) for n, t in query.items()}  # (B, 1, C, h, w)
        scores = []
        for e in self.expert_names:
            fg = grid_logits[e].softmax(dim=1)[:, 1:].unsqueeze(1)  # (B, 1, 1, h, w)
            per_shot = []
            for i in range(k):
                pseudo_query = {n: t[:, i] for n, t in supports.items()}
                out = self._expert_outputs(pseudo_query, pseudo_supports, fg, 1 - fg, only=e)
                prob = self._upsample(out, out_size)["experts"][e].softmax(dim=1)[:, 1]
                per_shot.append(soft_iou(prob, _resized(support_masks[:, i], out_size)))
            scores.append(torch.stack(per_shot, dim=1).mean(dim=1))
        return torch.stack(scores, dim=1)

    def _matcher_logits(
        self, query: dict, supports: dict, fg: Tensor, bg: Tensor, probe: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """The training-free member of the fusion (``model.fusion.matcher``) at the feature grid; ``probe``:
        the `probe` matcher's fit to these supports, when already made."""
        if self.cfg.fusion.matcher == "probe":
            w, b = probe if probe is not None else self.fit_probe(supports["high"], fg, bg)
            z = torch.einsum("bchw,bc->bhw", F.normalize(query["high"], dim=1), w) + b[:, None, None]
            return torch.stack([torch.zeros_like(z), z], dim=1)  # (bg, fg): the difference is the probe's
        return self._proto_logits(query["high"], supports["high"], fg, bg)

    def fit_probe(
        self, support_high: Tensor, fg: Tensor, bg: Tensor, fit: str | None = None
    ) -> tuple[Tensor, Tensor]:
        """The `probe` matcher (``model.fusion.matcher = probe``): `proto` adapted to the support set, a
        linear fg/bg decision on the unit-length frozen features fitted to the support mask, by
        ``model.fusion.probe.fit`` (or ``fit``): ridge (``ops.fit_support_ridge``, pulled toward proto's
        direction) or logistic (``ops.fit_support_probe``, starting from proto's direction x10, its
        logits' scale). (w (B, C), b (B,)); the probe's logit difference at a unit query vector ``q`` is
        ``q . w + b``. Fitted once per support set; a query then costs what proto's does."""
        settings = self.cfg.fusion.probe
        if (fit or settings.fit) == "ridge":
            return fit_support_ridge(support_high, fg, bg, settings.ridge_l2, settings.anchor)
        protos = self._prototypes(support_high, fg, bg)
        init = (protos[1] - protos[0]) * 10.0
        return fit_support_probe(support_high, fg, bg, init, settings.steps, settings.l2)

    def fit_box_probe(self, support_high: Tensor, fg: Tensor, bg: Tensor) -> tuple[Tensor, Tensor]:
        """The fit that refines a box support into a mask (dedn.weak.box_support): the logistic one,
        whatever ``probe.fit`` is (the box figures of docs/results.md were measured with it)."""
        return self.fit_probe(support_high, fg, bg, fit="logistic")

    def _proto_logits(self, query_high: Tensor, support_high: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
        """Training-free fg/bg nearest prototype (PANet without training), cosine similarity."""
        b, k, c, h, w = support_high.shape
        q = F.normalize(query_high, dim=1)
        if self.cfg.baseline.proto_matching == "nearest":
            s = F.normalize(support_high, dim=2).permute(0, 2, 1, 3, 4).reshape(b, c, -1)  # (B, C, K*hw)
            sim = torch.einsum("bcq,bcs->bqs", q.flatten(2), s)
            best = []
            for frac in (bg, fg):
                keep = frac.reshape(b, 1, -1) > 0.5
                best.append(sim.masked_fill(~keep, -2.0).max(dim=2).values.view(b, h, w))
            return torch.stack(best, dim=1) * 10.0
        protos = self._prototypes(support_high, fg, bg)
        sims = [F.cosine_similarity(q, p[:, :, None, None], dim=1) for p in protos]
        return torch.stack(sims, dim=1) * 10.0

    @staticmethod
    def _prototypes(support_high: Tensor, fg: Tensor, bg: Tensor) -> list[Tensor]:
        """The unit-length background and foreground prototypes (two (B, C)) of `proto`: masked averages
        over the shots, each shot weighted by its area."""
        b, k, c = support_high.shape[:3]
        s = support_high.flatten(0, 1)
        protos = []
        for frac in (bg, fg):
            f = frac.flatten(0, 1)
            area = f.sum(dim=(2, 3)).view(b, k, 1)
            per_shot = masked_average_pool(s, f).view(b, k, c)
            protos.append(F.normalize((per_shot * area).sum(1) / area.sum(1).clamp_min(1e-6), dim=1))
        return protos


def _resized(masks: Tensor, size) -> Tensor:
    """(B, H, W) label maps at ``size`` (nearest), e.g. for the training loss at a lower resolution."""
    if masks.shape[-2:] == tuple(size):
        return masks
    return F.interpolate(masks[:, None].float(), size, mode="nearest")[:, 0].long()


def build_model(cfg: ModelConfig, backbone: nn.Module | None = None) -> FewShotSegmenter:
    return FewShotSegmenter(cfg, backbone)
