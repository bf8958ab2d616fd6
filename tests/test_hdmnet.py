"""HDMNet as a peer method (model.method = hdmnet): the matching module, the reduced self-attention and the
correlation distillation against direct computations, shapes and gradients, and training, evaluation,
reload and prediction through the project's own commands."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dedn.config import HDMNetConfig, LossConfig, ModelConfig, flatten, load_config, to_dict
from dedn.engine.checkpoint import check_compatible, load_trained_model
from dedn.errors import ConfigError
from dedn.losses import dedn_loss
from dedn.models.hdmnet import Matching, ReducedSelfAttention, correlation_distillation
from dedn.models.network import FewShotSegmenter
from dedn.models.toy import ToyBackbone
from test_engine import TINY
from test_model import episode

REPO = Path(__file__).resolve().parents[1]


def hdmnet(**settings) -> FewShotSegmenter:
    cfg = ModelConfig(method="hdmnet", channels=16, hdmnet=HDMNetConfig(**settings))
    return FewShotSegmenter(cfg, ToyBackbone())


@pytest.mark.parametrize("k", [1, 5])
def test_output_shapes(k):
    torch.manual_seed(0)
    model = hdmnet().eval()
    query, supports, masks, _ = episode(k=k, size=96)  # a 12 x 12 grid: stages on 12, 6 and 3 cells
    with torch.no_grad():
        out = model(query, supports, masks)
    assert model.expert_names == ["hdmnet"] and list(out["experts"]) == ["hdmnet"]
    assert out["logits"].shape == (2, 2, 96, 96) and torch.equal(out["logits"], out["experts"]["hdmnet"])
    assert [tuple(c.shape) for c in out["aux"]["correlations"]] == [(2, 12, 12), (2, 6, 6), (2, 3, 3)]
    assert out["aux"]["prior"].shape == (2, 1, 12, 12) and torch.isfinite(out["logits"]).all()
    assert "fusion_weights" not in out and "probability" not in out


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model = hdmnet().train()
    query, supports, masks, target = episode(k=2, size=96)
    out = model(query, supports, masks)
    losses = dedn_loss(out, target, LossConfig(), model.expert_names)
    assert set(losses) == {"ce_hdmnet", "kl_correlation", "total"}
    assert losses["kl_correlation"] > 0
    losses["total"].backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(not n.startswith("backbone.") for n in trained)
    for name, p in trained.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    no_kl = dedn_loss(
        model(query, supports, masks), target, LossConfig(correlation_kl=0.0), model.expert_names
    )
    assert set(no_kl) == {"ce_hdmnet", "total"}


def test_the_shots_order_does_not_matter():
    """K shots are one pool of support cells (prototype and prior averaged, every shot's cells matched)."""
    torch.manual_seed(0)
    model = hdmnet().eval()
    query, supports, masks, _ = episode(k=3, size=96, seed=4)
    masks[:, 1, 40:70, 10:50] = 1  # shots with different masks
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = model(query, supports, masks)["logits"]
        b = model(query, supports[:, order], masks[:, order])["logits"]
    assert torch.allclose(a, b, atol=1e-5)


def test_matching_equals_the_cell_by_cell_computation():
    torch.manual_seed(0)
    c, heads, tau = 8, 2, 0.1
    matching = Matching(c, heads, tau, ratio=2).eval()
    b, k, h, w = 2, 2, 3, 4
    query = torch.randn(b, c, h, w)
    support = torch.randn(b, k, c, h, w)
    fg = torch.rand(b, k, 1, h, w) * (torch.rand(b, k, 1, h, w) > 0.4)
    prior = torch.rand(b, 1, h, w)
    with torch.no_grad():
        x, corr = matching(query, support, fg, prior)
        # the attention part by hand: every (query cell, head) against every support cell of every shot
        d = c // heads
        q_tok = query.flatten(2).transpose(1, 2)
        s_tok = support.permute(0, 1, 3, 4, 2).reshape(b, -1, c)
        weights = fg.reshape(b, -1)
        qp = matching.query(matching.norm_query(q_tok))
        ks = matching.key(matching.norm_support(s_tok))
        vs = matching.value(matching.norm_support(s_tok))
        attended = torch.zeros(b, h * w, c)
        expected_corr = torch.zeros(b, h * w)
        for i in range(b):
            for head in range(heads):
                sl = slice(head * d, (head + 1) * d)
                score = torch.zeros(h * w, s_tok.shape[1])
                for a in range(h * w):
                    for s in range(s_tok.shape[1]):
                        score[a, s] = F.cosine_similarity(qp[i, a, sl], ks[i, s, sl], dim=0) / tau
                # each support cell's weights over the query cells sum to its foreground fraction
                share = torch.exp(score) / torch.exp(score).sum(dim=0, keepdim=True) * weights[i]
                attended[i, :, sl] = share @ vs[i, :, sl]
                expected_corr[i] += (score * weights[i]).sum(1) / weights[i].sum() / heads
        t = q_tok + matching.project(attended)
        t = t + matching.feed_forward(matching.norm_out(t), h, w)
        expected = matching.merge(torch.cat([t.transpose(1, 2).reshape(b, c, h, w), prior], dim=1))
    assert torch.allclose(corr, expected_corr.view(b, h, w), atol=1e-4)
    assert torch.allclose(x, expected, atol=1e-5)


def test_support_background_cells_change_nothing_in_the_matching():
    torch.manual_seed(1)
    matching = Matching(8, 2, 0.1, ratio=2).eval()
    query, support, prior = torch.randn(1, 8, 3, 3), torch.randn(1, 1, 8, 3, 3), torch.rand(1, 1, 3, 3)
    fg = torch.zeros(1, 1, 1, 3, 3)
    fg[..., 1:, 1:] = 1.0
    other = support.clone()
    other[..., 0, :] = torch.randn(8, 3)  # new features in background cells only
    other[..., :, 0] = torch.randn(8, 3)
    with torch.no_grad():
        a, ca = matching(query, support, fg, prior)
        b, cb = matching(query, other, fg, prior)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ca, cb, atol=1e-6)


@pytest.mark.parametrize("reduction", [1, 2])
def test_reduced_self_attention_equals_attention_over_the_reduced_grid(reduction):
    torch.manual_seed(0)
    c, heads, h, w = 8, 2, 4, 6
    attention = ReducedSelfAttention(c, heads, reduction).eval()
    x = torch.randn(2, h * w, c)
    with torch.no_grad():
        got = attention(x, h, w)
        source = x
        if reduction > 1:
            grid = attention.reduce(x.transpose(1, 2).reshape(2, c, h, w))
            assert grid.shape[-2:] == (h // reduction, w // reduction)
            source = attention.norm(grid.flatten(2).transpose(1, 2))
        q = attention.query(x)
        kv = attention.key_value(source)
        keys, values = kv[..., :c], kv[..., c:]
        d = c // heads
        parts = []
        for head in range(heads):
            sl = slice(head * d, (head + 1) * d)
            scores = q[..., sl] @ keys[..., sl].transpose(1, 2) / math.sqrt(d)
            parts.append(scores.softmax(dim=-1) @ values[..., sl])
        expected = attention.project(torch.cat(parts, dim=-1))
    assert torch.allclose(got, expected, atol=1e-5)


def kl_direct(teacher_p, student_logits):
    """KL(p || softmax(s)) over all cells of one map, summed term by term (0 log 0 = 0)."""
    p, s = teacher_p.flatten().double(), student_logits.flatten().double()
    log_q = s - torch.logsumexp(s, dim=0)
    return sum(float(pi * (math.log(pi) - lq)) for pi, lq in zip(p, log_q, strict=True) if pi > 0)


def test_correlation_distillation_equals_the_direct_computation():
    torch.manual_seed(0)
    maps = [torch.randn(2, 8, 8), torch.randn(2, 4, 4), torch.randn(2, 2, 2)]  # finest first
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[0, :8, :] = 1  # episode 0: the two top coarse cells are all foreground
    target[1, 4:12, 8:16] = 1  # episode 1: half of two coarse cells
    target[1, 0, :] = 255  # ignored pixels are not foreground
    got = correlation_distillation(maps, target)
    coarse_teacher = [torch.tensor([[0.5, 0.5], [0.0, 0.0]]), torch.tensor([[0.0, 0.5], [0.0, 0.5]])]
    terms = [sum(kl_direct(coarse_teacher[i], maps[2][i]) for i in range(2)) / 2]
    for fine, coarse in ((maps[1], maps[2]), (maps[0], maps[1])):
        up = F.interpolate(coarse.unsqueeze(1), fine.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        terms.append(sum(kl_direct(up[i].flatten().softmax(0), fine[i]) for i in range(2)) / 2)
    assert got.item() == pytest.approx(sum(terms) / 3, rel=1e-5)


def test_correlation_distillation_teachers_get_no_gradient_and_empty_queries_are_left_out():
    maps = [torch.randn(1, 4, 4, requires_grad=True), torch.randn(1, 2, 2, requires_grad=True)]
    empty = torch.zeros(1, 8, 8, dtype=torch.long)  # no foreground: only the finer term remains
    correlation_distillation(maps, empty).backward()
    assert maps[1].grad.abs().sum() == 0 and maps[0].grad.abs().sum() > 0
    # a coarse map that puts all its mass on the query's foreground has nothing left to learn from it
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, :4, :4] = 1
    coarse = torch.full((1, 2, 2), -60.0)
    coarse[0, 0, 0] = 0.0
    fine = F.interpolate(coarse.unsqueeze(1), (4, 4), mode="bilinear", align_corners=False)[:, 0]
    assert correlation_distillation([fine, coarse], target).item() == pytest.approx(0.0, abs=1e-6)


def test_empty_support_predicts_background():
    model = hdmnet().eval()
    query, supports, masks, _ = episode(k=2, size=96)
    with torch.no_grad():
        out = model(query, supports, torch.zeros_like(masks))
    assert out["empty_support"].all() and (out["logits"].argmax(1) == 0).all()


@pytest.mark.parametrize(
    "setting, message",
    [
        ("model.hdmnet.heads=[3, 4]", "model.hdmnet.heads"),  # 3 does not divide 64
        ("model.hdmnet.heads=[]", "model.hdmnet.heads"),
        ("model.hdmnet.reductions=[4, 2]", "model.hdmnet.reductions"),  # 2 entries for 3 stages
        ("model.hdmnet.reductions=[4, 0, 1]", "model.hdmnet.reductions"),
        ("model.hdmnet.temperature=0", "model.hdmnet.temperature"),
        ("model.hdmnet.layers=0", "model.hdmnet.layers"),
        ("loss.correlation_kl=-1", "loss.correlation_kl"),
    ],
)
def test_bad_settings_are_refused(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.method=hdmnet", "model.channels=64", setting])


def test_hdmnet_offline_config_is_the_table_config_with_the_method_and_its_length_changed():
    cfg = load_config(REPO / "configs" / "hdmnet_offline.yaml")
    # HDMNet's own length, chosen on pseudo-novel validation (issue 40), with one validation at its end
    length = ["train.steps=2500", "train.val_every=2500"]
    table = load_config(REPO / "configs" / "pascal_offline.yaml", ["model.method=hdmnet", *length])
    assert cfg.model.method == "hdmnet"
    a, b = flatten(to_dict(cfg)), flatten(to_dict(table))
    assert sorted(k for k in a if a[k] != b[k]) == ["name", "output_dir"]
    check_compatible(table, cfg, "an hdmnet row model")


def test_train_evaluate_reload_predict_from_the_command_line(tmp_path):
    from dedn.predict import Predictor
    from usage_helpers import scene, train_and_evaluate

    records, ckpt, results = train_and_evaluate(tmp_path, [*TINY, "model.method=hdmnet"])
    trained = [r for r in records if "loss/total" in r]
    assert trained and all(r["loss/kl_correlation"] > 0 and r["loss/ce_hdmnet"] > 0 for r in trained)
    assert results["method"] == "hdmnet" and results["experts"] == {}
    assert len(results["per_seed"]) == 2 and 0.0 <= results["summary"]["miou"]["mean"] <= 1.0
    # the reloaded checkpoint gives the trained model's outputs, and the predictor takes it as it is
    cfg = load_config(None, [*TINY, "model.method=hdmnet"])
    torch.manual_seed(1)
    a, _ = load_trained_model(cfg, str(ckpt), torch.device("cpu"))
    torch.manual_seed(2)  # another initialisation: every weight must come from the checkpoint
    b, _ = load_trained_model(cfg, str(ckpt), torch.device("cpu"))
    query, supports, masks, _ = episode(k=2, size=64)
    with torch.no_grad():
        assert torch.equal(a(query, supports, masks)["logits"], b(query, supports, masks)["logits"])
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    support, mask = scene(seed=1)
    image, _ = scene(seed=2)
    prediction = predictor.predict(image, support, mask, return_experts=True)
    assert prediction.mask.shape == image.shape[:2] and list(prediction.experts) == ["hdmnet"]


def test_onnx_export_matches_pytorch(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from usage_helpers import assert_onnx_matches

    torch.manual_seed(0)
    model = FewShotSegmenter(ModelConfig(method="hdmnet", backbone="toy", weights=None, channels=16)).eval()
    # 88 px: an 11 x 11 grid, stages on 11, 6 and 3 cells (the stage pooling of the support masks must
    # trace for sizes that do not divide each other)
    assert_onnx_matches(model, tmp_path / "hdmnet.onnx", shots=2, size=88)
