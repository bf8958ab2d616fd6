"""HSNet as a peer method (model.method = hsnet): its parts against direct computations, its K-shot
modes, its training and scoring through the same engine as DEDN."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dedn.cli import main
from dedn.config import Config, HSNetConfig, ModelConfig, flatten, load_config, to_dict
from dedn.engine.checkpoint import load_trained_model, save_checkpoint, trainable_state
from dedn.engine.train import Trainer
from dedn.errors import ConfigError
from dedn.losses import dedn_loss
from dedn.models.hsnet import CenterPivotConv4d, HSNetHead, hypercorrelation, resize_4d, vote_logits
from dedn.models.network import FewShotSegmenter
from dedn.models.toy import ToyBackbone
from test_engine import TINY, tiny_config

REPO = Path(__file__).resolve().parents[1]


def hsnet_model(shot_mode: str = "vote", seed: int = 0, **hsnet) -> FewShotSegmenter:
    torch.manual_seed(seed)
    cfg = ModelConfig(method="hsnet", backbone="toy", weights=None)
    cfg.hsnet = dataclasses.replace(cfg.hsnet, shot_mode=shot_mode, **hsnet)
    return FewShotSegmenter(cfg, ToyBackbone())


def episode(b: int = 2, k: int = 1, size: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    query = torch.rand(b, 3, size, size, generator=g)
    supports = torch.rand(b, k, 3, size, size, generator=g)
    masks = torch.zeros(b, k, size, size, dtype=torch.long)
    for i in range(k):  # a different box per shot, so that the shots disagree
        masks[:, i, 8 + 2 * i : 30 + 2 * i, 10 : 28 + 3 * i] = 1
    masks[..., :2, :] = 255
    target = torch.zeros(b, size, size, dtype=torch.long)
    target[:, size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = 1
    return query, supports, masks, target


# ----------------------------------------------------------------------------------- center-pivot 4D conv
def naive_center_pivot_conv4d(conv: CenterPivotConv4d, x: torch.Tensor) -> torch.Tensor:
    """A direct 4D convolution, loop over every output cell, with the k^4 kernel that is zero except on
    the two center-pivot planes (the query conv's weights at the support center, the support conv's at
    the query center)."""
    wq, ws = conv.query_conv.weight.detach(), conv.support_conv.weight.detach()
    o, c, k, _ = wq.shape
    mid, pad, s = k // 2, k // 2, conv.stride
    kernel = torch.zeros(o, c, k, k, k, k, dtype=x.dtype)
    kernel[:, :, :, :, mid, mid] += wq
    kernel[:, :, mid, mid, :, :] += ws
    bias = (conv.query_conv.bias + conv.support_conv.bias).detach()
    n, _, hq, wq_, hs, ws_ = x.shape
    xp = F.pad(x, (pad,) * 8)  # zero padding on the four spatial dims
    ho, wo = (hs + 2 * pad - k) // s + 1, (ws_ + 2 * pad - k) // s + 1
    out = torch.zeros(n, o, hq, wq_, ho, wo, dtype=x.dtype)
    for i in range(hq):
        for j in range(wq_):
            for a in range(ho):
                for b in range(wo):
                    patch = xp[:, :, i : i + k, j : j + k, a * s : a * s + k, b * s : b * s + k]
                    out[:, :, i, j, a, b] = torch.einsum("ncpqrt,ocpqrt->no", patch, kernel) + bias
    return out


@pytest.mark.parametrize(
    "kernel,stride,shape",
    [
        (3, 1, (4, 5, 5, 4)),
        (3, 2, (4, 3, 6, 7)),
        (5, 2, (5, 4, 7, 5)),
        (3, 3, (3, 4, 7, 8)),
        (1, 2, (3, 3, 5, 4)),
    ],
)
def test_center_pivot_conv_equals_a_direct_4d_conv_with_a_center_pivot_kernel(kernel, stride, shape):
    torch.manual_seed(0)
    conv = CenterPivotConv4d(2, 3, kernel, stride)
    x = torch.randn(2, 2, *shape)
    fast = conv(x)
    hq, wq, hs, ws = shape
    assert fast.shape == (2, 3, hq, wq, -(-hs // stride), -(-ws // stride))
    with torch.no_grad():
        reference = naive_center_pivot_conv4d(conv, x)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=0)
    # and in double precision, to the last bits
    conv64 = conv.double()
    torch.testing.assert_close(
        conv64(x.double()), naive_center_pivot_conv4d(conv64, x.double()), atol=1e-12, rtol=0
    )


def test_center_pivot_conv_refuses_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        CenterPivotConv4d(1, 1, 4)


# ----------------------------------------------------------------------------------- hypercorrelation
def test_hypercorrelation_is_the_relu_cosine_against_masked_support_cells():
    g = torch.Generator().manual_seed(1)
    hq, wq, hs, ws = 3, 4, 4, 3
    query = [torch.randn(2, c, hq, wq, generator=g, dtype=torch.float64) for c in (5, 7)]
    support = [torch.randn(2, c, hs, ws, generator=g, dtype=torch.float64) for c in (5, 7)]
    fg = (torch.rand(2, 1, hs, ws, generator=g, dtype=torch.float64) > 0.4).double()
    fg[0, 0, 0, 0] = 0.25  # a partly covered cell: the cosine ignores the scale, so its full cosine
    corr = hypercorrelation(query, support, fg)
    assert corr.shape == (2, 2, hq, wq, hs, ws)
    for n in range(2):
        for layer in range(2):
            for i in range(hq):
                for j in range(wq):
                    for a in range(hs):
                        for b in range(ws):
                            q = query[layer][n, :, i, j]
                            s = support[layer][n, :, a, b]
                            cos = float(q @ s / (q.norm() * s.norm()))
                            expected = max(cos, 0.0) if fg[n, 0, a, b] > 0 else 0.0
                            assert abs(float(corr[n, layer, i, j, a, b]) - expected) < 1e-12
    assert (corr >= 0).all() and (corr <= 1 + 1e-12).all()
    assert (corr[..., fg[0, 0] == 0][0] == 0).all()  # masked-out support cells correlate with nothing


# ----------------------------------------------------------------------------------- the head
def test_resize_4d_keeps_constants_and_is_the_identity_at_its_size():
    x = torch.randn(2, 3, 4, 5, 3, 2)
    assert resize_4d(x, (4, 5, 3, 2)) is x
    const = torch.full((1, 2, 3, 3, 2, 2), 0.7)
    up = resize_4d(const, (6, 5, 4, 3))
    assert up.shape == (1, 2, 6, 5, 4, 3)
    torch.testing.assert_close(up, torch.full_like(up, 0.7))
    # a map that varies along the support dims only keeps its query dims untouched by the query resize
    ramp = torch.arange(4.0).view(1, 1, 1, 1, 4, 1).expand(1, 1, 2, 2, 4, 3).contiguous()
    assert torch.equal(resize_4d(ramp, (3, 3, 4, 3))[0, 0, 1, 2], ramp[0, 0, 0, 0])


def test_mixing_resizes_a_coarser_level_to_the_finer_one():
    torch.manual_seed(0)
    head = HSNetHead([2, 1], HSNetConfig(channels=[4, 8], support_strides=[2, 1], groups=2))
    fine, coarse = torch.rand(1, 2, 8, 8, 8, 8), torch.rand(1, 1, 4, 4, 4, 4)
    x = head.encode([fine, coarse])
    assert x.shape == (1, 8, 8, 8, 4, 4)
    # the coarse level does reach the result
    other = head.encode([fine, torch.rand(1, 1, 4, 4, 4, 4)])
    assert not torch.allclose(x, other)


def test_the_layers_are_the_encoders_levels_split_back_in_depth_order():
    model = hsnet_model()
    assert model.hsnet_pyramid == [["stage1"], ["stage2"], ["stage3"]]
    assert [len(block) for block in model.hsnet.squeeze] == [3, 3, 3]
    assert len(model.hsnet.mix) == 2
    images = torch.rand(2, 3, 48, 48)
    layers = model._layer_features(model.encode(images))
    raw = model.backbone(images, levels=["stage1", "stage2", "stage3"])
    assert torch.equal(layers["stage1"], raw["stage1"]) and torch.equal(layers["stage2"], raw["stage2"])
    torch.testing.assert_close(layers["stage3"], F.normalize(raw["stage3"], dim=1))
    # the split works on support stacks (B, K, C, h, w) too
    feats = {k: v.unsqueeze(1).expand(2, 3, *v.shape[1:]) for k, v in model.encode(images).items()}
    assert model._layer_features(feats)["stage2"].shape == (2, 3, 48, 6, 6)


def test_a_pyramid_of_several_layers_per_level_and_a_level_the_encoder_lacks():
    model = hsnet_model(pyramid=[["stage1", "stage2"], ["stage3"]])
    assert [block[0][0].query_conv.in_channels for block in model.hsnet.squeeze] == [2, 1]
    query, supports, masks, _ = episode()
    assert model(query, supports, masks)["logits"].shape == (2, 2, 48, 48)
    cfg = ModelConfig(method="hsnet", backbone="toy", weights=None, high_levels=["stage2"])
    cfg.hsnet.pyramid = [["stage3"]]
    with pytest.raises(ValueError, match="stage3"):
        FewShotSegmenter(cfg, ToyBackbone())


@pytest.mark.parametrize("shot_mode", ["vote", "joint"])
@pytest.mark.parametrize("k", [1, 5])
def test_output_shapes(shot_mode, k):
    model = hsnet_model(shot_mode)
    query, supports, masks, _ = episode(k=k)
    for training in (True, False):
        model.train(training)
        with torch.set_grad_enabled(training):
            out = model(query, supports, masks)
        assert out["logits"].shape == (2, 2, 48, 48)
        assert torch.isfinite(out["logits"]).all()
        passes = k if shot_mode == "vote" else 1
        assert out["shot_logits"].shape == (2, passes, 2, 48, 48)
        assert "experts" not in out and out["empty_support"].tolist() == [False, False]


@pytest.mark.parametrize("shot_mode,k", [("vote", 1), ("vote", 3), ("joint", 3)])
def test_gradients_reach_every_trainable_parameter(shot_mode, k):
    model = hsnet_model(shot_mode)
    query, supports, masks, target = episode(k=k)
    model.train()
    out = model(query, supports, masks)
    losses = dedn_loss(out, target, Config().loss, model.expert_names)
    assert set(losses) == {"ce", "total"}  # the plain cross-entropy, no distillation or contrast
    torch.testing.assert_close(losses["total"], F.cross_entropy(out["logits"], target, ignore_index=255))
    losses["total"].backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(n.startswith("hsnet.") for n in params)
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.backbone.parameters())


def test_vote_known_answers():
    def logits_from(fg_masks):  # (K, W) booleans -> (1, K, 2, 1, W) logits
        fg = torch.tensor(fg_masks, dtype=torch.float32)
        return torch.stack([1 - fg, fg], dim=1).view(1, len(fg_masks), 2, 1, -1)

    def vote(fg_masks):
        out = vote_logits(logits_from(fg_masks))
        return (out[0, 1, 0] > out[0, 0, 0]).int().tolist()

    # votes 3, 2, 1, 0 of at most 3: shares 1, 2/3, 1/3, 0
    assert vote([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]]) == [1, 1, 0, 0]
    # the largest count is 2: a pixel with 1 vote has share 0.5, which counts
    assert vote([[1, 1, 0], [1, 0, 0], [0, 0, 0]]) == [1, 1, 0]
    # nobody votes: background everywhere (no division by zero)
    assert vote([[0, 0], [0, 0]]) == [0, 0]


def test_vote_combines_the_one_shot_passes_and_joint_pools_before_one_decoder_pass():
    query, supports, masks, _ = episode(b=1, k=3)
    vote = hsnet_model("vote").eval()
    joint = hsnet_model("joint").eval()
    with torch.no_grad():
        out = vote(query, supports, masks)
        for i in range(3):  # pass i is the 1-shot model on support i
            alone = vote(query, supports[:, i : i + 1], masks[:, i : i + 1])["logits"]
            torch.testing.assert_close(out["shot_logits"][:, i], alone, atol=1e-5, rtol=0)
        assert torch.equal(out["logits"], vote_logits(out["shot_logits"]))
        # at K = 1 both modes are one and the same computation
        one = (query, supports[:, :1], masks[:, :1])
        assert torch.equal(vote(*one)["logits"], joint(*one)["logits"])
        # joint over K copies of one support is that support's 1-shot answer
        copies = (query, supports[:, :1].expand(1, 3, 3, 48, 48), masks[:, :1].expand(1, 3, 48, 48))
        torch.testing.assert_close(joint(*copies)["logits"], vote(*one)["logits"], atol=1e-5, rtol=0)
        # joint: every shot's squeezed cells pooled together, then one decoder pass
        joint_logits = joint(query, supports, masks)["logits"]
        per_shot = []
        for i in range(3):
            q = joint._layer_features(joint.encode(query))
            s = joint._layer_features(joint.encode(supports[:, i]))
            fg, _ = joint._support_fractions(masks[:, i : i + 1], (6, 6))
            corr = [hypercorrelation([q[n]], [s[n]], fg[:, 0]) for n in ("stage1", "stage2", "stage3")]
            per_shot.append(joint.hsnet.encode(corr).mean(dim=(4, 5)))
        expected = joint.hsnet.decode(torch.stack(per_shot).mean(dim=0))
        expected = F.interpolate(expected, (48, 48), mode="bilinear", align_corners=False)
        torch.testing.assert_close(joint_logits, expected, atol=1e-5, rtol=0)
        order = [2, 0, 1]  # so the shots' order does not matter
        torch.testing.assert_close(
            joint(query, supports[:, order], masks[:, order])["logits"], joint_logits, atol=1e-5, rtol=0
        )
        # and differs from the vote on supports that disagree
        assert not torch.allclose(joint_logits, out["logits"])
    # in training, the vote (not differentiable) is replaced by the mean of the passes' logits
    vote.train()
    out = vote(query, supports, masks)
    torch.testing.assert_close(out["logits"], out["shot_logits"].mean(dim=1))


def test_empty_support_predicts_background():
    model = hsnet_model().eval()
    query, supports, masks, _ = episode()
    masks[1] = 0
    with torch.no_grad():
        out = model(query, supports, masks)
    assert out["empty_support"].tolist() == [False, True]
    assert (out["logits"][1, 0] > out["logits"][1, 1]).all()


# ----------------------------------------------------------------------------------- configuration
def test_hsnet_settings_are_checked():
    assert load_config(None, ["model.method=hsnet"]).model.hsnet.shot_mode == "vote"
    bad = {
        "model.hsnet.shot_mode=both": "shot_mode",
        "model.hsnet.kernel_size=4": "kernel_size",
        "model.hsnet.channels=[8, 6]": "channels",
        "model.hsnet.support_strides=[2, 2]": "support_strides",
        "model.hsnet.support_strides=[2, 0, 1]": "support_strides",
        "model.hsnet.pyramid=[[]]": "pyramid",
        "model.hsnet.groups=0": "groups",
    }
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])


def test_the_offline_config_differs_from_pascal_offline_in_the_method_and_its_own_recipe():
    hsnet = flatten(to_dict(load_config(REPO / "configs" / "hsnet_offline.yaml")))
    pascal = flatten(to_dict(load_config(REPO / "configs" / "pascal_offline.yaml")))
    assert hsnet["model.method"] == "hsnet"
    differ = {k for k in pascal if pascal[k] != hsnet[k]}
    recipe = {"train.optimizer", "train.lr", "train.weight_decay", "train.steps", "train.val_every"}
    assert differ == {"name", "output_dir", "model.method"} | recipe
    # the paper's optimizer, the length its search chose (docs/methods/hsnet.md), one validation at the end
    assert (hsnet["train.optimizer"], hsnet["train.lr"], hsnet["train.weight_decay"]) == ("adam", 0.001, 0.0)
    assert hsnet["train.steps"] == hsnet["train.val_every"] == 2500


# ----------------------------------------------------------------------------------- engine
def test_train_and_eval_from_the_command_line(tmp_path):
    sets = [a for s in [*TINY, "model.method=hsnet"] for a in ("--set", s)]
    assert main(["train", "--quiet", "--output", str(tmp_path), *sets]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = {k for r in records for k in r if k.startswith("loss/")}
    assert losses == {"loss/ce", "loss/total"}
    assert any("val/miou" in r for r in records)
    ckpt = tmp_path / "checkpoints" / "best.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["config"]["model"]["method"] == "hsnet"
    assert state["model"] and all(k.startswith("hsnet.") for k in state["model"])
    for shots, mode in ((1, "vote"), (2, "vote"), (2, "joint")):
        out = tmp_path / f"eval-{shots}-{mode}"
        extra = ["--set", f"data.shots={shots}", "--set", f"model.hsnet.shot_mode={mode}"]
        assert main(["eval", "--quiet", "--output", str(out), "--checkpoint", str(ckpt), *sets, *extra]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["method"] == "hsnet" and results["settings"]["shots"] == shots
        assert results["experts"] == {} and 0.0 <= results["summary"]["miou"]["mean"] <= 1.0
        assert (out / "results.md").read_text().startswith("# hsnet")


def test_a_reloaded_checkpoint_gives_identical_outputs(tmp_path):
    cfg = tiny_config(tmp_path, "model.method=hsnet")
    trainer = Trainer(cfg, tmp_path, torch.device("cpu"), progress=False)
    trainer.fit(stop_after=2)
    path = save_checkpoint(tmp_path / "reload.pt", trainer.state())
    model, _ = load_trained_model(cfg, str(path), torch.device("cpu"))
    trainer.model.eval()
    query, supports, masks, _ = episode(b=1, k=2, size=64, seed=3)
    with torch.no_grad():
        a = trainer.model(query, supports, masks)["logits"]
        b = model(query, supports, masks)["logits"]
    assert torch.equal(a, b)
    assert trainable_state(model).keys() == trainable_state(trainer.model).keys()
    # the K-shot mode is a test-time setting: the same checkpoint loads with the other one
    joint = tiny_config(tmp_path, "model.method=hsnet", "model.hsnet.shot_mode=joint")
    load_trained_model(joint, str(path), torch.device("cpu"))
    # a different architecture is refused
    wider = tiny_config(tmp_path, "model.method=hsnet", "model.hsnet.decoder_channels=16")
    with pytest.raises(Exception, match="model.hsnet.decoder_channels"):
        load_trained_model(wider, str(path), torch.device("cpu"))


def test_predictor_and_export(tmp_path):
    from dedn.predict import Predictor
    from usage_helpers import make_checkpoint, scene, toy_config

    ckpt = make_checkpoint(tmp_path / "hsnet.pt", toy_config(method="hsnet"))
    predictor = Predictor.from_checkpoint(ckpt)
    query, _ = scene(50, 70, seed=2)
    support, mask = scene(seed=1)
    result = predictor.predict(query, [support, support], [mask, mask], return_experts=True)
    assert result.mask.shape == (50, 70) and result.probability.dtype == np.float32
    assert result.experts == {} and result.fusion_weights is None
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dedn.export import export_onnx

    report = export_onnx(predictor.model, tmp_path / "hsnet.onnx", shots=2, image_size=64)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4
