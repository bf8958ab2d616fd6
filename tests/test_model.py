"""The network: every method and switch runs forward and backward; the parts behave as specified."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dedn.config import LossConfig, ModelConfig
from dedn.losses import dedn_loss, positive_guided_kl, prototype_contrast
from dedn.models.experts import shot_attention, support_attention
from dedn.models.fusion import fuse_probabilities, fusion_weights
from dedn.models.network import FewShotSegmenter
from dedn.models.ops import (
    continuity_guidance,
    cosine_prior,
    mask_fractions,
    scene_normalize,
    soft_iou,
    soft_iou_fractions,
)
from dedn.models.toy import ToyBackbone


def episode(b=2, k=1, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.rand(b, 3, size, size, generator=g)
    supports = torch.rand(b, k, 3, size, size, generator=g)
    masks = torch.zeros(b, k, size, size, dtype=torch.long)
    masks[..., size // 4 : size // 2, size // 4 : 3 * size // 4] = 1
    masks[..., :2, :] = 255
    target = torch.zeros(b, size, size, dtype=torch.long)
    target[:, size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = 1
    return query, supports, masks, target


def with_changes(cfg, **changes):
    """ModelConfig with dotted-path changes, e.g. {'object.ocg.enabled': False}."""
    cfg = dataclasses.replace(cfg)
    for path, value in changes.items():
        node = cfg
        *parents, last = path.split("__")
        for p in parents:
            child = dataclasses.replace(getattr(node, p))
            setattr(node, p, child)
            node = child
        setattr(node, last, value)
    return cfg


ABLATIONS = {
    "full": {},
    "no_ocg": {"object__ocg__enabled": False},
    "ocg_window": {"object__ocg__window": 2},
    "no_prior": {"object__use_prior": False},
    "sn_none": {"scenario__normalization": "none"},
    "sn_adain": {"scenario__normalization": "adain"},
    "gram": {"scenario__gram_difference": True},
    "fusion_mean": {"fusion__mode": "mean"},
    "no_confidence": {"fusion__confidence": False},
    "query_features": {"head_inputs": "features"},
    "query_features_gram": {"head_inputs": "features", "scenario__gram_difference": True},
    "per_expert_reduce": {"reduce": "per_expert"},
    "shot_mean": {"scenario__shot_pooling": "mean"},
}


def run_train_step(model, loss_cfg, k):
    query, supports, masks, target = episode(k=k)
    model.train()
    out = model(query, supports, masks)
    losses = dedn_loss(out, target, loss_cfg, model.expert_names)
    losses["total"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(v) for v in losses.values())
    return out, losses


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_dedn_switches_forward_backward(name, k):
    cfg = with_changes(ModelConfig(channels=16), **ABLATIONS[name])
    model = FewShotSegmenter(cfg, ToyBackbone())
    out, _ = run_train_step(model, LossConfig(), k)
    assert out["logits"].shape == (2, 2, 48, 48)
    assert out["fusion_weights"].shape == (2, 2)
    assert torch.allclose(out["fusion_weights"].sum(1), torch.ones(2))


@pytest.mark.parametrize("mode", ["correct", "foreground", "off"])
def test_loss_switches(mode):
    model = FewShotSegmenter(ModelConfig(channels=16), ToyBackbone())
    loss_cfg = LossConfig()
    loss_cfg.distill.mode = mode
    loss_cfg.contrast.weight = 0.0 if mode == "off" else 0.1
    _, losses = run_train_step(model, loss_cfg, 1)
    assert ("pkl" in losses) == (mode != "off")
    assert ("contrast" in losses) == (mode != "off")


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("method", ["object", "scenario"])
def test_single_expert_baselines(method, k):
    model = FewShotSegmenter(ModelConfig(method=method, channels=16), ToyBackbone())
    out, losses = run_train_step(model, LossConfig(), k)
    assert model.expert_names == [method]
    assert "pkl" not in losses and "ce_fused" not in losses
    assert torch.equal(out["logits"], out["experts"][method])


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("method", ["proto", "prior"])
def test_training_free_baselines(method, k):
    model = FewShotSegmenter(ModelConfig(method=method), ToyBackbone())
    assert not model.trainable
    assert not [p for p in model.parameters() if p.requires_grad]
    query, supports, masks, _ = episode(k=k)
    out = model(query, supports, masks)
    assert out["logits"].shape == (2, 2, 48, 48)


def test_proto_finds_the_support_object_in_its_own_image():
    """With the query equal to the support, nearest-prototype matching recovers the mask."""
    model = FewShotSegmenter(ModelConfig(method="proto"), ToyBackbone())
    size = 64
    image = torch.zeros(1, 3, size, size)
    image[..., 16:48, 16:48] = torch.tensor([1.0, 0.2, 0.1]).view(1, 3, 1, 1)
    mask = torch.zeros(1, 1, size, size, dtype=torch.long)
    mask[..., 16:48, 16:48] = 1
    pred = model(image, image.unsqueeze(1), mask)["logits"].argmax(1)[0]
    inter = ((pred == 1) & (mask[0, 0] == 1)).sum()
    union = ((pred == 1) | (mask[0, 0] == 1)).sum()
    assert inter / union > 0.6


def test_empty_support_mask_predicts_background_without_nan():
    model = FewShotSegmenter(ModelConfig(channels=16), ToyBackbone()).eval()
    query, supports, masks, _ = episode(k=2)
    masks[0] = 0  # episode 0: no foreground in any shot
    out = model(query, supports, masks)
    assert torch.isfinite(out["logits"]).all()
    assert (out["logits"][0].argmax(0) == 0).all()
    assert out["empty_support"].tolist() == [True, False]


def test_positive_guided_kl_is_zero_when_experts_agree():
    logits = torch.randn(2, 2, 8, 8)
    target = torch.randint(0, 2, (2, 8, 8))
    assert positive_guided_kl(logits, logits.clone(), target).item() == pytest.approx(0.0, abs=1e-7)


def test_positive_guided_kl_picks_the_teacher_per_pixel_and_teaches_only_the_student():
    target = torch.tensor([[[1, 0]]])  # one image, two pixels: fg then bg
    # pixel 0 (fg): a is right and more confident -> a teaches b; pixel 1 (bg): b is right -> b teaches a
    a = torch.tensor([[[[0.0, 2.0]], [[3.0, 0.0]]]], requires_grad=True)  # (1, 2, 1, 2): class x pixel
    b = torch.tensor([[[[0.0, 0.0]], [[0.5, -3.0]]]], requires_grad=True)
    loss = positive_guided_kl(a, b, target)
    loss.backward()
    # a is the teacher at pixel 0 -> no gradient there; b is the teacher at pixel 1 -> no gradient there
    assert a.grad[..., 0].abs().sum() == 0 and a.grad[..., 1].abs().sum() > 0
    assert b.grad[..., 1].abs().sum() == 0 and b.grad[..., 0].abs().sum() > 0


def test_positive_guided_kl_skips_pixels_where_the_teacher_is_wrong_and_foreground_mode():
    target = torch.tensor([[[1, 0]]])
    # both experts predict background at the fg pixel: the more confident-in-label one is still wrong
    a = torch.tensor([[[[2.0, 2.0]], [[1.0, 0.0]]]], requires_grad=True)
    b = torch.tensor([[[[3.0, 0.0]], [[0.0, 0.0]]]], requires_grad=True)
    loss = positive_guided_kl(a, b, target)
    loss.backward()
    assert a.grad[..., 0].abs().sum() == 0 and b.grad[..., 0].abs().sum() == 0
    fg_only = positive_guided_kl(a.detach(), b.detach(), target, mode="foreground")
    assert fg_only.item() == 0.0  # the only fg pixel has a wrong teacher


def test_positive_guided_kl_ignores_255():
    a, b = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    target = torch.full((1, 4, 4), 255)
    assert positive_guided_kl(a, b, target).item() == 0.0


def test_fusion_favours_the_expert_that_is_better_on_the_support():
    """Constructed episode: expert 'good' reproduces the support mask, 'bad' predicts its inverse."""
    mask = torch.zeros(1, 16, 16, dtype=torch.long)
    mask[:, 4:12, 4:12] = 1
    good = torch.stack([1 - mask.float(), mask.float()], dim=1) * 0.9 + 0.05
    bad = good.flip(1)
    scores = torch.stack([soft_iou(p[:, 1], mask) for p in (good, bad)], dim=1)
    weights = fusion_weights(scores, temperature=0.1)
    assert weights[0, 0] > 0.95
    fused = fuse_probabilities([good, bad], weights)
    assert torch.equal(fused.argmax(1), mask)


def test_model_fusion_weights_follow_support_scores(monkeypatch):
    """Inside the model: the expert scored higher on the support set gets the larger weight."""
    model = FewShotSegmenter(ModelConfig(channels=16), ToyBackbone()).eval()
    query, supports, masks, _ = episode(k=3)
    monkeypatch.setattr(model, "support_scores", lambda *a, **k: torch.tensor([[0.9, 0.2], [0.1, 0.7]]))
    out = model(query, supports, masks)
    assert out["fusion_weights"][0, 0] > 0.99 and out["fusion_weights"][1, 1] > 0.99


def test_leave_one_out_support_scores_shape_and_range():
    model = FewShotSegmenter(ModelConfig(channels=16), ToyBackbone()).eval()
    query, supports, masks, _ = episode(k=3)
    out = model(query, supports, masks)
    assert out["support_scores"].shape == (2, 2)
    assert ((out["support_scores"] >= 0) & (out["support_scores"] <= 1)).all()


def test_scene_normalize_removes_scene_statistics():
    x = torch.randn(2, 4, 6, 6) * 5 + 3
    y = scene_normalize(x)
    assert torch.allclose(y.mean(dim=(2, 3)), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(y.std(dim=(2, 3), unbiased=False), torch.ones(2, 4), atol=1e-3)
    # a global change of brightness/contrast of the scene does not change the normalised features
    assert torch.allclose(scene_normalize(2 * x + 7), y, atol=1e-4)


def test_continuity_guidance_spreads_the_prior_over_a_uniform_object():
    features = torch.zeros(1, 2, 6, 6)
    features[:, 0] = 1.0
    features[:, 1, 1:5, 1:5] = 5.0  # an object region whose pixels look alike
    features[:, 0, 1:5, 1:5] = 0.0
    prior = torch.zeros(1, 1, 6, 6)
    prior[..., 2, 2] = 1.0  # the prior fires on one discriminative pixel only
    g = continuity_guidance(prior, features, steps=1, temperature=0.1)
    inside = g[..., 1:5, 1:5]
    assert inside.min() > 0.9  # every object pixel now carries the guidance
    outside = g.clone()
    outside[..., 1:5, 1:5] = 0
    assert outside.max() < 0.1


def test_cosine_prior_is_normalised_and_averaged_over_shots():
    q = torch.randn(1, 8, 5, 5)
    s = torch.randn(1, 3, 8, 5, 5)
    fg = torch.zeros(1, 3, 1, 5, 5)
    fg[..., 1:3, 1:3] = 1
    prior = cosine_prior(q, s, fg)
    assert prior.shape == (1, 1, 5, 5)
    assert prior.min() >= 0 and prior.max() <= 1
    empty = cosine_prior(q, s, torch.zeros_like(fg))
    assert torch.equal(empty, torch.zeros_like(empty))


def test_contrastive_loss_is_lower_when_fg_pixels_match_the_prototype():
    c, h, w = 4, 4, 4
    target = torch.zeros(1, h, w, dtype=torch.long)
    target[:, :2] = 1
    proto = torch.tensor([[1.0, 0, 0, 0]])
    support = torch.zeros(1, 1, c, h, w)
    support[:, :, 1] = 1.0  # support background points along channel 1
    bg = torch.ones(1, 1, 1, h, w)
    aligned = torch.zeros(1, c, h, w)
    aligned[:, 0, :2] = 1.0
    aligned[:, 1, 2:] = 1.0
    swapped = aligned.flip(2)
    good = prototype_contrast(aligned, target, proto, support, bg)
    bad = prototype_contrast(swapped, target, proto, support, bg)
    assert good < 0.01 < bad


@pytest.mark.parametrize(
    "backbone, weights",
    [
        ("efficientnet_lite0", "imagenet"),
        ("efficientnet_lite1", "imagenet"),
        ("efficientnet_lite2", "imagenet"),
        ("resnet50", None),
        pytest.param("resnet101", None, marks=pytest.mark.slow),
    ],
)
def test_every_backbone_trains_dedn(backbone, weights):
    """DEDN on each real backbone (ResNet with random weights: none ship offline), K = 2, tiny input."""
    cfg = ModelConfig(backbone=backbone, weights=weights, channels=16)
    model = FewShotSegmenter(cfg)
    query, supports, masks, target = episode(b=1, k=2, size=65)
    model.train()
    out = model(query, supports, masks)
    assert out["logits"].shape == (1, 2, 65, 65)
    dedn_loss(out, target, LossConfig(), model.expert_names)["total"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.backbone.parameters())


def test_cosine_prior_equals_the_best_match_over_all_foreground_cells():
    """The prior gathers the support foreground cells; it must equal a brute-force maximum over them,
    for every episode of a batch with different foreground counts, and for an empty shot."""
    torch.manual_seed(3)
    b, k, c, h, w = 3, 2, 8, 6, 5
    q, s = torch.randn(b, c, h, w), torch.randn(b, k, c, h, w)
    fg = (torch.rand(b, k, 1, h, w) < torch.tensor([0.1, 0.5, 0.9]).view(b, 1, 1, 1, 1)).float()
    fg[1, 0] = 0.0
    prior = cosine_prior(q, s, fg)
    expected = torch.zeros(b, 1, h, w)
    for i in range(b):
        for shot in range(k):
            cells = fg[i, shot, 0].flatten() > 0.5
            if not cells.any():
                continue  # an empty shot contributes a zero map
            qn = torch.nn.functional.normalize(q[i].flatten(1), dim=0)  # (C, hw)
            sn = torch.nn.functional.normalize(s[i, shot].flatten(1)[:, cells], dim=0)
            best = (qn.T @ sn).max(dim=1).values
            expected[i, 0] += ((best - best.min()) / (best.max() - best.min() + 1e-6)).view(h, w)
    torch.testing.assert_close(prior, expected / k, rtol=0, atol=1e-6)


@pytest.mark.parametrize("head_inputs", ["relations", "features"])
def test_relation_heads_see_only_query_support_relations(head_inputs):
    """head_inputs=relations: each head's first layer gets group-wise prototype similarities (2 per
    group), prior and guidance, or per-head evidence maps (2 per head); nothing else."""
    cfg = with_changes(ModelConfig(channels=16, head_inputs=head_inputs), object__groups=4, scenario__heads=2)
    model = FewShotSegmenter(cfg, ToyBackbone()).eval()
    widths = {}
    for name, expert in model.experts.items():
        merge = expert.merge[0][0]
        merge.register_forward_hook(lambda m, args, out, name=name: widths.update({name: args[0].shape[1]}))
    query, supports, masks, _ = episode()
    with torch.no_grad():
        out = model(query, supports, masks)
        # the same query with a support mask on another region gives another answer from both experts
        moved = torch.zeros_like(masks)
        moved[..., -12:, -12:] = 1
        other = model(query, supports, moved)
    if head_inputs == "relations":
        assert widths == {"object": 2 * 4 + 2, "scenario": 2 * 2}
    else:
        assert widths == {"object": 2 * 16 + 3, "scenario": 2 * 16 + 2}
    for name in ("object", "scenario"):
        assert not torch.allclose(out["experts"][name], other["experts"][name])


def test_frozen_relations_are_per_level_prototype_similarities():
    """model.object.frozen_relations adds, per frozen high level, the cosine similarity of the query to the
    support's fg and bg prototypes: 2 maps per level, equal to the explicit computation."""
    cfg = ModelConfig(channels=16, high_levels=["stage2", "stage3"])  # two levels of 48 and 64 channels
    cfg = with_changes(cfg, object__groups=4, object__frozen_relations=True)
    model = FewShotSegmenter(cfg, ToyBackbone()).eval()
    expert = model.experts["object"]
    levels = expert.high_channels
    assert levels == [48, 64]
    widths = {}
    expert.merge[0][0].register_forward_hook(lambda m, args, out: widths.update(w=args[0].shape[1]))
    query, supports, masks, _ = episode()
    with torch.no_grad():
        model(query, supports, masks)
        q = model.encode(query)["high"]
        b, k = supports.shape[:2]
        s = model.encode(supports.flatten(0, 1))["high"]
        s = s.view(b, k, *s.shape[1:])
        fg, bg = model._support_fractions(masks, q.shape[-2:])
        maps = expert.frozen_similarities(q, s, fg, bg)
    assert widths["w"] == 2 * 4 + 2 + 2 * len(levels)
    assert maps.shape == (b, 2 * len(levels), *q.shape[-2:])
    start = 0
    for level, width in enumerate(levels):
        for j, frac in enumerate((fg, bg)):
            sl = slice(start, start + width)
            area = frac.sum(dim=(3, 4))  # (B, K, 1)
            pooled = (s[:, :, sl] * frac).sum(dim=(3, 4)) / frac.sum(dim=(3, 4)).clamp_min(1e-6)
            proto = (pooled * area).sum(1) / area.sum(1).clamp_min(1e-6)
            want = torch.nn.functional.cosine_similarity(q[:, sl], proto[:, :, None, None], dim=1)
            torch.testing.assert_close(maps[:, j * len(levels) + level], want, rtol=1e-4, atol=1e-5)
        start += width


def test_scenario_frozen_evidence_is_normalised_attention_on_each_frozen_level():
    """model.scenario.frozen_relations: per frozen high level, the share of a query cell's softmax attention
    (cosine / T between scene-normalised features) on support fg and bg, as 2 extra head inputs."""
    cfg = ModelConfig(channels=16, high_levels=["stage2", "stage3"])
    cfg = with_changes(cfg, scenario__heads=2, scenario__frozen_relations=True)
    model = FewShotSegmenter(cfg, ToyBackbone()).eval()
    expert = model.experts["scenario"]
    widths = {}
    expert.merge[0][0].register_forward_hook(lambda m, args, out: widths.update(w=args[0].shape[1]))
    query, supports, masks, _ = episode(k=2)
    masks[:, 0, :4] = 255  # ignored support cells are not attended to
    with torch.no_grad():
        model(query, supports, masks)
        q = model.encode(query)["high"]
        b, k = supports.shape[:2]
        s = model.encode(supports.flatten(0, 1))["high"].view(b, k, -1, *q.shape[-2:])
        fg, bg = model._support_fractions(masks, q.shape[-2:])
        maps = expert.frozen_evidence(q, s, fg, bg)
    assert widths["w"] == 2 * 2 + 2 * 2
    labelled = (fg + bg).flatten(1) > 0.5  # (B, K*hw)
    start = 0
    for level, width in enumerate([48, 64]):
        ql = scene_normalize(q[:, start : start + width])
        sl = scene_normalize(s[:, :, start : start + width].flatten(0, 1)).view(b, k, width, *q.shape[-2:])
        qv = torch.nn.functional.normalize(ql.flatten(2), dim=1)  # (B, c, hw)
        sv = torch.nn.functional.normalize(sl.permute(0, 2, 1, 3, 4).flatten(2), dim=1)  # (B, c, K*hw)
        logits = torch.einsum("bcq,bcs->bqs", qv, sv) / cfg.scenario.temperature
        attn = logits.masked_fill(~labelled[:, None], float("-inf")).softmax(dim=2)
        want_fg = (attn @ fg.flatten(1)[:, :, None]).view(b, *q.shape[-2:])
        want_bg = (attn @ bg.flatten(1)[:, :, None]).view(b, *q.shape[-2:])
        torch.testing.assert_close(maps[:, level], want_fg, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(maps[:, 2 + level], want_bg, rtol=1e-4, atol=1e-5)
        start += width


def test_relation_layout_needs_divisible_groups_and_heads():
    from dedn.config import load_config
    from dedn.errors import ConfigError

    with pytest.raises(ConfigError, match="model.object.groups = 3"):
        load_config(None, ["model.channels=16", "model.object.groups=3"])
    with pytest.raises(ConfigError, match="model.scenario.heads = 5"):
        load_config(None, ["model.scenario.heads=5"])
    load_config(None, ["model.channels=16", "model.object.groups=3", "model.head_inputs=features"])


@pytest.mark.parametrize("head_inputs", ["relations", "features"])
def test_scenario_attention_matches_the_explicit_softmax_and_skips_ignored_cells(head_inputs):
    """The fused attention equals softmax(q.k / T) over the labelled support cells, applied to the
    support's fg/bg shares (and, for head_inputs=features, the projected support features)."""
    from dedn.config import ScenarioExpertConfig
    from dedn.models.experts import ScenarioExpert

    torch.manual_seed(0)
    b, k, c, h, w = 2, 2, 8, 5, 6
    cfg = ScenarioExpertConfig(attention_dim=8, heads=2 if head_inputs == "relations" else 1)
    expert = ScenarioExpert(c, cfg, inputs=head_inputs).eval()
    fq, fs = torch.randn(b, c, h, w), torch.randn(b, k, c, h, w)
    fg = (torch.rand(b, k, h, w) > 0.6).float()
    bg = 1 - fg
    fg[:, 0, 0], bg[:, 0, 0] = 0, 0  # an ignored row: no label, never attended to
    seen = {}
    expert.merge.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        expert(fq, fs, fg, bg)
        n, cells = expert.heads, k * h * w
        qn, sn = expert.normalize(fq, fs)
        q = torch.nn.functional.normalize(expert.query_proj(qn).view(b, n, -1, h * w), dim=2)
        key = expert.key_proj(sn.flatten(0, 1)).view(b, k, n, -1, h * w).permute(0, 2, 3, 1, 4)
        key = torch.nn.functional.normalize(key.reshape(b, n, -1, cells), dim=2)
        logits = torch.einsum("bndq,bnds->bnqs", q, key) / cfg.temperature
        labelled = (fg + bg).view(b, 1, 1, cells) > 0.5
        attention = logits.masked_fill(~labelled, float("-inf")).softmax(dim=3)
        assert attention[..., ~labelled[0, 0, 0]].abs().max() == 0
        expected = [attention @ fg.view(b, 1, cells, 1), attention @ bg.view(b, 1, cells, 1)]
        expected = [e.view(b, n, h, w) for e in expected]
        if head_inputs == "features":
            value = expert.value_proj(sn.flatten(0, 1)).view(b, k, c, h * w).permute(0, 2, 1, 3)
            context = (value.reshape(b, c, cells) @ attention[:, 0].transpose(1, 2)).view(b, c, h, w)
            expected = [qn, context, *expected]
    torch.testing.assert_close(seen["x"], torch.cat(expected, dim=1), rtol=1e-4, atol=1e-5)


def test_fusion_gate_starts_as_plain_averaging_and_trains_only_itself():
    """model.fusion.gate: at initialisation the gated fusion equals plain averaging; its cross-entropy
    reaches the gate's parameters and nothing else; mode=gate scores the model with it."""
    cfg = ModelConfig(channels=16)
    model = FewShotSegmenter(cfg, ToyBackbone()).train()
    query, supports, masks, target = episode()
    out = model(query, supports, masks)
    mean = torch.stack([out["experts"][e].softmax(dim=1) for e in model.expert_names]).mean(dim=0)
    torch.testing.assert_close(out["gate_probability"], mean, rtol=1e-5, atol=1e-6)
    terms = dedn_loss(out, target, LossConfig(), model.expert_names)
    assert "ce_gate" in terms
    terms["ce_gate"].backward()
    touched = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and all(n.startswith("gate.") for n in touched)
    eval_cfg = with_changes(cfg, fusion__mode="gate")
    scored = FewShotSegmenter(eval_cfg, ToyBackbone())
    scored.load_state_dict(model.state_dict())
    with torch.no_grad():
        gated = scored.eval()(query, supports, masks)
    torch.testing.assert_close(gated["probability"], gated["gate_probability"])
    assert gated["fusion_weights"].shape == (2, 2)
    untrained = FewShotSegmenter(with_changes(eval_cfg, fusion__gate=False), ToyBackbone()).eval()
    with pytest.raises(ValueError, match="model.fusion.gate"):
        untrained(query, supports, masks)


def test_cycle_scores_judge_each_expert_by_its_own_query_prediction():
    """fusion.mode=cycle: expert e's score is how well its query prediction, used as a support, finds the
    support's object again; it depends on e's query prediction alone and is a soft IoU in [0, 1]."""
    cfg = with_changes(ModelConfig(channels=16), fusion__mode="cycle")
    model = FewShotSegmenter(cfg, ToyBackbone()).eval()
    query, supports, masks, _ = episode(k=2)
    b, k = supports.shape[:2]
    with torch.no_grad():
        q = model.encode(query)
        s = model.encode(supports.flatten(0, 1))
        s = {n: t.view(b, k, *t.shape[1:]) for n, t in s.items()}
        fg, bg = model._support_fractions(masks, q["mid"].shape[-2:])
        grid = model._expert_outputs(q, s, fg, bg)["experts"]
        size = tuple(query.shape[-2:])
        scores = model.cycle_scores(q, s, masks, grid, size)
        assert scores.shape == (b, 2) and ((scores >= 0) & (scores <= 1)).all()
        changed = dict(grid, scenario=-grid["scenario"])  # another query prediction of one expert
        other = model.cycle_scores(q, s, masks, changed, size)
        torch.testing.assert_close(other[:, 0], scores[:, 0])
        assert not torch.allclose(other[:, 1], scores[:, 1])
        out = model(query, supports, masks)
    torch.testing.assert_close(out["support_scores"], scores)
    assert torch.isfinite(out["probability"]).all()


@pytest.mark.parametrize("reduce", ["shared", "per_expert"])
def test_reduction_runs_on_the_query_before_the_supports(reduce):
    """Dropout draws its masks in call order, so this order fixes what a training seed produces."""
    torch.manual_seed(0)
    model = FewShotSegmenter(ModelConfig(backbone="toy", weights=None, channels=16, reduce=reduce)).train()
    layers = [model.reduce] if reduce == "shared" else list(model.reduce.values())
    calls = []
    for layer in layers:
        layer.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    query, supports, masks, _ = episode(b=2, k=3)
    model(query, supports, masks)
    assert calls[:2] == [2, 6]  # the query batch, then the 2 x 3 supports


def test_mean_shot_pooling_averages_one_attention_per_support():
    torch.manual_seed(0)
    b, heads, k, hw, n, d = 2, 3, 4, 6, 5, 8
    q = torch.nn.functional.normalize(torch.randn(b, heads, hw, d), dim=3)
    key = torch.nn.functional.normalize(torch.randn(b, heads, k, n, d), dim=4)
    fg = (torch.rand(b, k, n) > 0.5).float()
    bg = 1 - fg
    extra = torch.randn(b, k, n, 7)
    # the second episode's last support is all "ignore": it gives no evidence and is left out
    fg[1, -1], bg[1, -1] = 0, 0
    mean = shot_attention(q, key, fg, bg, 0.1, "mean", extra)
    one = [support_attention(q, key[:, :, i], fg[:, i], bg[:, i], 0.1, extra[:, i]) for i in range(k)]
    assert torch.allclose(mean[0], torch.stack(one)[:, 0].mean(0), atol=1e-6)
    assert torch.allclose(mean[1], torch.stack(one[:-1])[:, 1].mean(0), atol=1e-6)
    # one softmax over all supports is another thing: where the best-matching support dominates
    joint = shot_attention(q, key, fg, bg, 0.1, "joint", extra)
    assert not torch.allclose(joint, mean, atol=1e-3)
    # with one support the two poolings are the same computation
    single = [key[:, :, :1], fg[:, :1], bg[:, :1], 0.1]
    assert torch.equal(shot_attention(q, *single, "mean"), shot_attention(q, *single, "joint"))


@pytest.mark.parametrize("k", [1, 3])
def test_matcher_joins_awf_as_a_third_member_and_is_the_proto_baseline(k):
    """model.fusion.matcher=proto: AWF weighs three members (the experts and the training-free `proto`),
    each scored on the support set; the matcher's map is exactly the `proto` baseline's."""
    cfg = ModelConfig(channels=16, fusion=dataclasses.replace(ModelConfig().fusion, matcher="proto"))
    backbone = ToyBackbone()
    model = FewShotSegmenter(cfg, backbone).eval()
    assert model.fusion_members == ["object", "scenario", "proto"]
    query, supports, masks, _ = episode(k=k)
    with torch.no_grad():
        out = model(query, supports, masks)
        proto = FewShotSegmenter(ModelConfig(method="proto"), backbone).eval()(query, supports, masks)
    assert out["fusion_weights"].shape == (2, 3) and out["support_scores"].shape == (2, 3)
    assert torch.allclose(out["fusion_weights"].sum(1), torch.ones(2))
    assert torch.allclose(out["matcher"]["proto"], proto["logits"], atol=1e-5)
    # without the matcher the experts' weights and maps are those of a two-member AWF
    plain = FewShotSegmenter(ModelConfig(channels=16), backbone).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        two = plain(query, supports, masks)
    assert torch.allclose(out["support_scores"][:, :2], two["support_scores"])
    for name in ("object", "scenario"):
        assert torch.equal(out["experts"][name], two["experts"][name])


def test_matcher_takes_over_when_the_support_shows_the_experts_failing(monkeypatch):
    """Constructed support scores: experts near 0, the matcher near 1 -> the fused map is the matcher's."""
    cfg = ModelConfig(channels=16, fusion=dataclasses.replace(ModelConfig().fusion, matcher="proto"))
    model = FewShotSegmenter(cfg, ToyBackbone()).eval()
    query, supports, masks, _ = episode(k=1)
    monkeypatch.setattr(model, "support_scores", lambda *a, **k: torch.tensor([[0.05, 0.1, 0.9]] * 2))
    with torch.no_grad():
        out = model(query, supports, masks)
    assert out["fusion_weights"][:, 2].min() > 0.99
    matcher = out["matcher"]["proto"].softmax(dim=1)
    decided = (matcher[:, 1] - 0.5).abs() > 0.05  # pixels where the matcher is not on the fence
    assert torch.equal(out["probability"].argmax(1)[decided], matcher.argmax(1)[decided])


def test_matcher_is_a_test_time_setting_and_off_for_single_experts():
    from dedn.config import Config
    from dedn.engine.checkpoint import check_compatible

    saved, current = Config(), Config()
    current.model.fusion.matcher = "proto"
    check_compatible(saved, current, "model.pt")  # a checkpoint may be scored with or without it
    fusion = dataclasses.replace(ModelConfig().fusion, matcher="proto")
    cfg = ModelConfig(method="object", channels=16, fusion=fusion)
    assert FewShotSegmenter(cfg, ToyBackbone()).fusion_members == ["object"]


def test_self_support_pass_scores_each_shot_from_itself_alone():
    """support_pass=self: shot k's scores depend on shot k alone (the same as scoring it as a 1-shot
    support set), and at K = 1 the two support passes are the same computation."""
    cfg = with_changes(
        ModelConfig(channels=16), **{"fusion__matcher": "proto", "fusion__support_pass": "self"}
    )
    model = FewShotSegmenter(cfg, ToyBackbone()).eval()
    _, supports, masks, _ = episode(k=3)
    masks[:, 1, 10:20, 30:40] = 1  # shots that differ
    feats = model.encode(supports.flatten(0, 1))
    feats = {n: t.view(2, 3, *t.shape[1:]) for n, t in feats.items()}
    together = model.shot_scores(feats, masks, (48, 48))
    assert together.shape == (2, 3, 3)
    for i in range(3):
        alone = model.shot_scores(
            {n: t[:, i : i + 1] for n, t in feats.items()}, masks[:, i : i + 1], (48, 48)
        )
        assert torch.equal(together[:, i], alone[:, 0])
    loo = with_changes(cfg, **{"fusion__support_pass": "leave_one_out"})
    model_loo = FewShotSegmenter(loo, ToyBackbone()).eval()
    model_loo.load_state_dict(model.state_dict())
    one = {n: t[:, :1] for n, t in feats.items()}
    assert torch.equal(
        model.support_scores(one, masks[:, :1], (48, 48)),
        model_loo.support_scores(one, masks[:, :1], (48, 48)),
    )
    assert not torch.equal(model_loo.shot_scores(feats, masks, (48, 48)), together)


def test_soft_iou_on_fractions_is_soft_iou_on_a_grid_as_fine_as_the_mask_and_weighs_mixed_cells():
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(2, 12, 12, generator=g)
    masks = torch.randint(0, 2, (2, 12, 12), generator=g)
    masks[:, :3] = 255
    fg, bg = (x[:, 0] for x in mask_fractions(masks, (12, 12)))
    torch.testing.assert_close(soft_iou_fractions(prob, fg, bg), soft_iou(prob, masks))
    # one cell, half foreground and half ignore, predicted at p: labelled share 0.5, target share 0.5
    half = torch.tensor([[[0.5]]])
    p = torch.tensor([[[0.8]]])
    inter, union = 0.8 * 0.5 * 0.5, 0.8 * 0.5 + 0.5 - 0.8 * 0.5 * 0.5
    torch.testing.assert_close(
        soft_iou_fractions(p, half, torch.zeros(1, 1, 1)), torch.tensor([inter / union])
    )


def test_grid_resolution_fuses_on_the_feature_grid_and_scores_the_support_there():
    """model.fusion.resolution=grid: the fused probability is the fusion of the members' grid
    probabilities, upsampled; AWF's scores are soft IoUs against the shot's mask fractions on the grid."""
    cfg = with_changes(ModelConfig(channels=16), **{"fusion__matcher": "proto", "fusion__resolution": "grid"})
    model = FewShotSegmenter(cfg, ToyBackbone()).eval()
    query, supports, masks, _ = episode(k=1)
    q = model.encode(query)
    s = {n: t.view(2, 1, *t.shape[1:]) for n, t in model.encode(supports.flatten(0, 1)).items()}
    with torch.no_grad():
        out = model.forward_features(q, s, masks, (48, 48))
        grid = q["mid"].shape[-2:]
        fg, bg = model._support_fractions(masks, grid)
        members = model._expert_outputs(q, s, fg, bg)["experts"]
        logits = [members[e] for e in model.expert_names] + [model._matcher_logits(q, s, fg, bg)]
        # the support as its own query, scored on the grid
        sq = {n: t[:, 0] for n, t in s.items()}
        own = model._expert_outputs(sq, s, fg, bg)["experts"]
        own = [own[e] for e in model.expert_names] + [model._matcher_logits(sq, s, fg, bg)]
        scores = torch.stack(
            [soft_iou_fractions(x.softmax(dim=1)[:, 1], fg[:, 0, 0], bg[:, 0, 0]) for x in own], dim=1
        )
    torch.testing.assert_close(out["support_scores"], scores)
    fused = fuse_probabilities([x.softmax(dim=1) for x in logits], fusion_weights(scores, 0.1))
    expected = torch.nn.functional.interpolate(fused, (48, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["probability"], expected)
    assert out["logits"].shape == (2, 2, 48, 48)
    assert out["experts"]["object"].shape == (2, 2, 48, 48)  # the members themselves at the output size
    # the default fuses at the output size: another computation, the same checkpoint
    output = FewShotSegmenter(with_changes(cfg, **{"fusion__resolution": "output"}), ToyBackbone()).eval()
    output.load_state_dict(model.state_dict())
    with torch.no_grad():
        other = output.forward_features(q, s, masks, (48, 48))
    assert not torch.allclose(other["probability"], out["probability"])
    torch.testing.assert_close(other["experts"]["object"], out["experts"]["object"])


def _separable_support(seed=0):
    """Support cells (1, 1, 4, 6, 6): foreground cells point near e0 + 0.6 e2, background near e1 + 0.6 e2
    with one background cell close to the foreground (so proto's midpoint misplaces it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 1, 4, 6, 6)
    fg = torch.zeros(1, 1, 1, 6, 6)
    fg[..., 1:4, 1:4] = 1.0
    x[:, :, 0] = fg[:, :, 0] * 1.0
    x[:, :, 1] = (1 - fg[:, :, 0]) * 1.0
    x[:, :, 2] = 0.6
    x[:, :, 3] = 0.05 * torch.randn(1, 1, 6, 6, generator=g)
    x[0, 0, :, 5, 5] = torch.tensor([0.55, 0.45, 0.6, 0.0])  # a background cell that looks foreground-ish
    return x, fg, 1 - fg


def test_support_probe_fits_the_support_mask_and_stays_near_proto_when_regularised():
    """fit_support_probe: the class-balanced fit separates the support's own cells (proto's direction does
    not, for the hard background cell), is deterministic and runs under no_grad; with a huge l2 the
    direction stays at its initial value (only the bias moves)."""
    from dedn.models.ops import fit_support_probe

    x, fg, bg = _separable_support()
    unit = torch.nn.functional.normalize(x, dim=2)
    pf = (unit * fg).sum(dim=(3, 4)) / fg.sum()
    pb = (unit * bg).sum(dim=(3, 4)) / bg.sum()
    init = (torch.nn.functional.normalize(pf, dim=2) - torch.nn.functional.normalize(pb, dim=2))[:, 0] * 10
    with torch.no_grad():
        w, b = fit_support_probe(x, fg, bg, init, steps=50, l2=1e-4)
    z = torch.einsum("bkchw,bc->bkhw", unit, w) + b
    assert (z[fg[:, :, 0] > 0.5] > 0).all() and (z[bg[:, :, 0] > 0.5] < 0).all()
    assert not w.requires_grad and not b.requires_grad
    w2, b2 = fit_support_probe(x, fg, bg, init, steps=50, l2=1e-4)
    assert torch.equal(w, w2) and torch.equal(b, b2)
    stiff, _ = fit_support_probe(x, fg, bg, init, steps=50, l2=1e6)
    assert torch.allclose(stiff, init, atol=1e-3)


def test_support_ridge_is_the_weighted_least_squares_solution():
    """fit_support_ridge solves the class-balanced ridge problem it states: the same (w, b) as an
    independent least-squares solve of the stacked system (each labelled cell's row scaled by the square
    root of its weight, l2 rows pulling w toward anchor x the prototypes' difference); unlabelled cells do
    not count; each episode of a batch is fitted alone; it is deterministic and carries no gradient."""
    from dedn.models.ops import fit_support_ridge

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 5, 4, 4, generator=g)
    fg = (torch.rand(2, 2, 1, 4, 4, generator=g) > 0.6).float()
    bg = 1 - fg
    fg[0, 0, 0, 0, :2] = bg[0, 0, 0, 0, :2] = 0.0  # two unlabelled cells (padding or void)
    l2, anchor = 0.3, 5.0
    w, b = fit_support_ridge(x, fg, bg, l2, anchor)
    assert w.shape == (2, 5) and b.shape == (2,) and not w.requires_grad
    for e in range(2):
        unit = torch.nn.functional.normalize(x[e], dim=1).permute(0, 2, 3, 1).reshape(-1, 5).double()
        f, h = fg[e].reshape(-1).double(), bg[e].reshape(-1).double()
        keep = (f + h) > 0.5
        unit, f = unit[keep], f[keep]
        weight = torch.where(f > 0.5, 0.5 / f.sum(), 0.5 / (1 - f).sum())
        pf = torch.nn.functional.normalize((unit * f[:, None]).sum(0), dim=0)
        pb = torch.nn.functional.normalize((unit * (1 - f)[:, None]).sum(0), dim=0)
        rows = torch.cat([unit, torch.ones(len(unit), 1, dtype=unit.dtype)], dim=1) * weight.sqrt()[:, None]
        reg = torch.diag(torch.tensor([l2] * 5 + [1e-6], dtype=unit.dtype).sqrt())
        system = torch.cat([rows, reg])
        rhs = torch.cat(
            [(2 * f - 1) * weight.sqrt(), l2**0.5 * anchor * (pf - pb), torch.zeros(1, dtype=unit.dtype)]
        )
        expected = torch.linalg.lstsq(system, rhs[:, None]).solution[:, 0]
        torch.testing.assert_close(w[e].double(), expected[:5], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[e].double(), expected[5], rtol=1e-4, atol=1e-5)
        alone = fit_support_ridge(x[e : e + 1], fg[e : e + 1], bg[e : e + 1], l2, anchor)
        torch.testing.assert_close(alone[0][0], w[e])
    noisy = x.clone()
    noisy[0, 0, :, 0, :2] = torch.randn(5, 2, generator=g)  # what the unlabelled cells hold is ignored
    torch.testing.assert_close(fit_support_ridge(noisy, fg, bg, l2, anchor)[0], w)
    assert all(
        torch.equal(p, q) for p, q in zip(fit_support_ridge(x, fg, bg, l2, anchor), (w, b), strict=True)
    )


def test_support_ridge_separates_the_support_and_shrinks_to_proto():
    """On a separable support a weak pull fits every labelled cell, the hard background cell included
    (about +1 on the object, -1 off it); a huge pull leaves anchor x proto's direction."""
    from dedn.models.ops import fit_support_ridge

    x, fg, bg = _separable_support()
    unit = torch.nn.functional.normalize(x, dim=2)
    w, b = fit_support_ridge(x, fg, bg, l2=1e-4, anchor=5.0)
    z = torch.einsum("bkchw,bc->bkhw", unit, w) + b
    assert (z[fg[:, :, 0] > 0.5] > 0).all() and (z[bg[:, :, 0] > 0.5] < 0).all()
    assert z[fg[:, :, 0] > 0.5].mean() == pytest.approx(1.0, abs=0.2)
    pf = (unit * fg).sum(dim=(3, 4)) / fg.sum()
    pb = (unit * bg).sum(dim=(3, 4)) / bg.sum()
    proto = torch.nn.functional.normalize(pf, dim=2) - torch.nn.functional.normalize(pb, dim=2)
    stiff, _ = fit_support_ridge(x, fg, bg, l2=1e6, anchor=5.0)
    torch.testing.assert_close(stiff, 5.0 * proto[:, 0], atol=1e-4, rtol=1e-4)


def test_probe_fit_setting_picks_the_fit_and_boxes_keep_the_logistic_one():
    """model.fusion.probe.fit: logistic (the default) is ops.fit_support_probe from proto's direction x10,
    ridge is ops.fit_support_ridge with the probe's settings; the box refinement always uses the
    logistic fit, whatever the setting."""
    from dedn.models.ops import fit_support_probe, fit_support_ridge

    assert ModelConfig().fusion.probe.fit == "logistic"
    x, fg, bg = _separable_support()
    logistic = FewShotSegmenter(
        with_changes(ModelConfig(channels=16), fusion__matcher="probe"), ToyBackbone()
    )
    settings = logistic.cfg.fusion.probe
    ridge_cfg = with_changes(logistic.cfg, fusion__probe=dataclasses.replace(settings, fit="ridge"))
    ridge = FewShotSegmenter(ridge_cfg, ToyBackbone())
    expected = fit_support_ridge(x, fg, bg, settings.ridge_l2, settings.anchor)
    assert all(torch.equal(p, q) for p, q in zip(ridge.fit_probe(x, fg, bg), expected, strict=True))
    protos = logistic._prototypes(x, fg, bg)
    old = fit_support_probe(x, fg, bg, (protos[1] - protos[0]) * 10.0, settings.steps, settings.l2)
    for model in (ridge, logistic):
        box = model.fit_box_probe(x, fg, bg)
        assert all(torch.equal(p, q) for p, q in zip(box, old, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(logistic.fit_probe(x, fg, bg), old, strict=True))


def test_probe_matcher_is_proto_adapted_and_fitted_once_per_support_set(monkeypatch):
    """model.fusion.matcher=probe: the third AWF member's logits are linear in the unit query features with
    the fitted (w, b); out['probe'] handed back gives the same output without fitting again."""
    cfg = with_changes(ModelConfig(channels=16), fusion__matcher="probe", fusion__confidence=False)
    model = FewShotSegmenter(cfg, ToyBackbone()).eval()
    assert model.fusion_members == ["object", "scenario", "probe"]
    query, supports, masks, _ = episode(k=1)
    with torch.no_grad():
        out = model(query, supports, masks)
        w, b = out["probe"]
        q = torch.nn.functional.normalize(model.encode(query)["high"], dim=1)
        z = torch.einsum("bchw,bc->bhw", q, w) + b[:, None, None]
        grid = out["matcher"]["probe"]
        direct = torch.nn.functional.interpolate(
            torch.stack([torch.zeros_like(z), z], 1), grid.shape[-2:], mode="bilinear", align_corners=False
        )
        assert torch.allclose(grid, direct, atol=1e-5)
        calls = []
        fit = model.fit_probe
        monkeypatch.setattr(model, "fit_probe", lambda *a: calls.append(1) or fit(*a))
        qf = model.encode(query)
        sf = {n: t.view(2, 1, *t.shape[1:]) for n, t in model.encode(supports.flatten(0, 1)).items()}
        again = model.forward_features(qf, sf, masks, (48, 48), out["support_scores"], probe=out["probe"])
    assert not calls
    assert torch.allclose(again["probability"], out["probability"], atol=1e-6)


def test_probe_settings_are_checked_and_test_time():
    from dedn.config import Config, load_config
    from dedn.engine.checkpoint import check_compatible
    from dedn.errors import ConfigError

    with pytest.raises(ConfigError, match="model.fusion.probe"):
        load_config(None, ["model.fusion.probe.steps=0"])
    with pytest.raises(ConfigError, match="model.fusion.probe"):
        load_config(None, ["model.fusion.probe.l2=-1"])
    with pytest.raises(ConfigError, match="model.fusion.probe.fit"):
        load_config(None, ["model.fusion.probe.fit=lasso"])
    with pytest.raises(ConfigError, match="ridge_l2"):
        load_config(None, ["model.fusion.probe.ridge_l2=0"])
    saved, current = Config(), Config()
    current.model.fusion.matcher, current.model.fusion.probe.l2 = "probe", 0.5
    current.model.fusion.probe.fit = "ridge"  # the fit is a test-time setting too
    current.model.fusion.score = "hard"  # how AWF scores its members: also a test-time setting
    check_compatible(saved, current, "model.pt")


def test_hard_score_is_the_iou_of_each_members_decision():
    """fusion.score=hard: a member's score on a shot is the IoU of its mask (probability > 0.5) against
    the shot's, whatever its confidence; soft scores of the same predictions are lower for a member that
    is right but unsure."""
    cfg = with_changes(ModelConfig(channels=16), **{"fusion__matcher": "proto", "fusion__score": "hard"})
    model = FewShotSegmenter(cfg, ToyBackbone()).eval()
    soft = FewShotSegmenter(with_changes(cfg, **{"fusion__score": "soft"}), ToyBackbone()).eval()
    soft.load_state_dict(model.state_dict())
    _, supports, masks, _ = episode(k=2)
    feats = model.encode(supports.flatten(0, 1))
    feats = {n: t.view(2, 2, *t.shape[1:]) for n, t in feats.items()}
    hard_scores = model.shot_scores(feats, masks, (48, 48))
    # the same numbers by hand: each member's leave-one-out decision against the shot's mask
    grid = feats["mid"].shape[-2:]
    for i in range(2):
        rest = [1 - i]
        pq = {n: t[:, i] for n, t in feats.items()}
        ps = {n: t[:, rest] for n, t in feats.items()}
        fg, bg = model._support_fractions(masks[:, rest], grid)
        out = model._expert_outputs(pq, ps, fg, bg)
        members = [*out["experts"].values(), model._matcher_logits(pq, ps, fg, bg)]
        for e, logits in enumerate(members):
            up = F.interpolate(logits, (48, 48), mode="bilinear", align_corners=False)
            decision = up[:, 1] > up[:, 0]
            target = masks[:, i] == 1
            valid = masks[:, i] != 255
            inter = (decision & target & valid).flatten(1).sum(1).float()
            union = ((decision & valid) | target).flatten(1).sum(1).float()
            assert torch.allclose(hard_scores[:, i, e], inter / union, atol=1e-6)
    assert not torch.equal(hard_scores, soft.shot_scores(feats, masks, (48, 48)))
    # a right but unsure prediction: soft IoU below 1, hard IoU 1
    unsure = torch.stack([torch.zeros(1, 4, 4), (masks[:1, 0, :4, :4] == 1).float() * 0.4], dim=1)
    assert model._scored(unsure).max() <= 1 and soft._scored(unsure).max() < 0.6


def test_background_coverage_is_the_nearest_support_background_cell():
    """ops.background_coverage: a query cell equal to a support background cell is covered (1); a cell that
    is only like the foreground, or like nothing, is not; supports without background cover everything."""
    from dedn.models.ops import background_coverage

    e = torch.eye(4)
    support = torch.zeros(1, 1, 4, 1, 2)
    support[0, 0, :, 0, 0], support[0, 0, :, 0, 1] = e[0], e[1]  # a background cell and a foreground cell
    bg = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    query = torch.stack([e[0], e[1], e[2], (e[0] + e[2])], dim=1).view(1, 4, 1, 4)
    cover = background_coverage(query, support, bg)
    assert cover.shape == (1, 1, 1, 4)
    torch.testing.assert_close(cover.flatten(), torch.tensor([1.0, 0.0, 0.0, 2**-0.5]))
    # two shots: the nearest background cell of either
    two = torch.cat([support, support.roll(1, dims=2)], dim=1)  # shot 2's background cell is e1
    cover2 = background_coverage(query, two, torch.cat([bg, bg], dim=1))
    torch.testing.assert_close(cover2.flatten(), torch.tensor([1.0, 1.0, 0.0, 2**-0.5]))
    assert torch.equal(background_coverage(query, support, torch.zeros_like(bg)), torch.ones(1, 1, 1, 4))


def test_probe_coverage_leaves_uncovered_cells_to_the_experts():
    """model.fusion.probe.coverage: where the support's background covers no query cell the fusion is the
    experts' AWF alone (the probe's weight is 0 there); a window every cell passes is the plain fusion;
    pixel factors of 1 change nothing in fuse_probabilities."""
    base = with_changes(ModelConfig(channels=16), fusion__matcher="probe", fusion__confidence=False)
    plain = FewShotSegmenter(base, ToyBackbone()).eval()
    query, supports, masks, _ = episode(k=1)
    models = {}
    for name, window in (("open", [-1.0, -0.999]), ("shut", [0.9999, 1.0])):
        cfg = with_changes(base, fusion__probe=dataclasses.replace(base.fusion.probe, coverage=window))
        models[name] = FewShotSegmenter(cfg, ToyBackbone()).eval()
        models[name].load_state_dict(plain.state_dict())
    with torch.no_grad():
        out = plain(query, supports, masks)
        opened = models["open"](query, supports, masks)
        shut = models["shut"](query, supports, masks)
    torch.testing.assert_close(opened["probability"], out["probability"])
    assert "matcher_cover" not in out and opened["matcher_cover"].shape == (2, 1, 48, 48)
    # shut: every cell but those equal to a support background cell leaves the probe out
    w = out["fusion_weights"]
    experts = [out["experts"][e].softmax(dim=1) for e in plain.expert_names]
    alone = (w[:, 0, None, None, None] * experts[0] + w[:, 1, None, None, None] * experts[1]) / (
        w[:, :2].sum(dim=1)[:, None, None, None]
    )
    uncovered = shut["matcher_cover"][:, 0] == 0
    assert uncovered.float().mean() > 0.5
    assert torch.allclose(shut["probability"][:, 1][uncovered], alone[:, 1][uncovered], atol=1e-5)
    probs = [x.softmax(dim=1) for x in experts]
    ones = [torch.ones_like(probs[0][:, :1])] * 2
    torch.testing.assert_close(
        fuse_probabilities(probs, w[:, :2], False, ones), fuse_probabilities(probs, w[:, :2], False)
    )


def test_probe_coverage_is_checked_and_test_time():
    from dedn.config import Config, load_config
    from dedn.engine.checkpoint import check_compatible
    from dedn.errors import ConfigError

    probe = "model.fusion.matcher=probe"
    for bad in ("[0.4,0.2]", "[0.2]", "[0.2,1.5]"):
        with pytest.raises(ConfigError, match="model.fusion.probe.coverage"):
            load_config(None, [probe, f"model.fusion.probe.coverage={bad}"])
    # a weight for a probe that is not there would be silently ignored: refused
    with pytest.raises(ConfigError, match="set model.fusion.matcher=probe"):
        load_config(None, ["model.fusion.matcher=proto", "model.fusion.probe.coverage=[0.2,0.4]"])
    cfg = load_config(None, [probe, "model.fusion.probe.coverage=[0.2,0.4]"])
    assert cfg.model.fusion.probe.coverage == [0.2, 0.4]
    # a test-time setting: a checkpoint saved without it is scored with it
    saved, current = Config(), Config()
    current.model.fusion.matcher, current.model.fusion.probe.coverage = "probe", [0.2, 0.4]
    check_compatible(saved, current, "model.pt")
