"""PFENet as a peer method (model.method = pfenet): the prior, the Feature Enrichment Module, the loss, and
training, evaluation, reload, prediction and export through the project's own commands."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dedn.config import LossConfig, ModelConfig, PFENetConfig, flatten, load_config, to_dict
from dedn.engine.checkpoint import check_compatible, load_trained_model, save_checkpoint, trainable_state
from dedn.errors import CheckpointError, ConfigError
from dedn.losses import dedn_loss
from dedn.models.network import FewShotSegmenter
from dedn.models.ops import area_pool, masked_cosine_prior
from dedn.models.pfenet import FeatureEnrichment, mean_prototype, scale_sizes
from dedn.models.toy import ToyBackbone
from test_engine import TINY
from test_model import episode

REPO = Path(__file__).resolve().parents[1]


def pfenet(**pfenet_settings) -> FewShotSegmenter:
    cfg = ModelConfig(method="pfenet", channels=16, pfenet=PFENetConfig(**pfenet_settings))
    return FewShotSegmenter(cfg, ToyBackbone())


def test_scale_sizes_follow_the_grid():
    default = PFENetConfig().scales
    assert scale_sizes((60, 60), default) == [(60, 60), (30, 30), (15, 15), (8, 8)]  # PFENet's
    assert scale_sizes((27, 27), default) == [(27, 27), (14, 14), (7, 7), (4, 4)]
    assert scale_sizes((6, 4), [1.0, 0.1]) == [(6, 4), (1, 1)]  # never below one cell


@pytest.mark.parametrize("k", [1, 5])
def test_output_shapes(k):
    torch.manual_seed(0)
    model = pfenet().eval()
    query, supports, masks, _ = episode(k=k)  # 48 px: a 6 x 6 grid
    with torch.no_grad():
        out = model(query, supports, masks)
    assert model.expert_names == ["pfenet"] and list(out["experts"]) == ["pfenet"]
    assert out["logits"].shape == (2, 2, 48, 48) and torch.equal(out["logits"], out["experts"]["pfenet"])
    assert [tuple(x.shape) for x in out["intermediate"]] == [
        (2, 2, 6, 6),
        (2, 2, 3, 3),
        (2, 2, 2, 2),
        (2, 2, 1, 1),
    ]
    assert out["aux"]["prior"].shape == (2, 1, 6, 6) and out["aux"]["prototype"].shape == (2, 16)
    assert torch.isfinite(out["logits"]).all()
    assert "fusion_weights" not in out and "probability" not in out  # one member: nothing to fuse


def test_gradients_reach_every_trainable_parameter_of_the_head():
    torch.manual_seed(0)
    model = pfenet().train()
    query, supports, masks, target = episode(k=2)
    out = model(query, supports, masks)
    losses = dedn_loss(out, target, LossConfig(), model.expert_names)
    assert set(losses) == {"ce_pfenet", "ce_intermediate", "total"}
    losses["total"].backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(not n.startswith("backbone.") for n in trained)
    assert any(n.startswith("reduce.") for n in trained) and any(".fem.classifiers.3." in n for n in trained)
    for name, p in trained.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # without intermediate supervision, the per-scale classifiers get no gradient at all
    model.zero_grad(set_to_none=True)
    out = model(query, supports, masks)
    no_aux = dedn_loss(out, target, LossConfig(intermediate_ce=0.0), model.expert_names)
    assert "ce_intermediate" not in no_aux
    no_aux["total"].backward()
    assert all(p.grad is None for n, p in trained.items() if ".fem.classifiers." in n)
    assert all(p.grad is not None for n, p in trained.items() if ".fem.classifiers." not in n)


def naive_prior(q, s, fg, eps=1e-6):
    """The prior by the paper's formula, one cell at a time: the support masked by its mask, the best
    cosine per query cell (a zero vector scores 0), min-max normalised per query, averaged over shots."""
    b, k, c, h, w = s.shape
    out = torch.zeros(b, 1, h, w, dtype=torch.float64)
    for i in range(b):
        for shot in range(k):
            best = torch.zeros(h, w, dtype=torch.float64)
            for y in range(h):
                for x in range(w):
                    a = q[i, :, y, x].double()
                    scores = []
                    for v in range(h):
                        for u in range(w):
                            sv = s[i, shot, :, v, u].double() * fg[i, shot, 0, v, u].double()
                            den = a.norm() * sv.norm()
                            scores.append(float(a @ sv / den) if den > 0 else 0.0)
                    best[y, x] = max(scores)
            out[i, 0] += (best - best.min()) / (best.max() - best.min() + eps) / k
    return out


def test_prior_equals_the_cell_by_cell_computation():
    g = torch.Generator().manual_seed(3)
    b, k, c, h, w = 2, 3, 5, 4, 5
    q = torch.randn(b, c, h, w, generator=g)  # signed features: some best matches are below 0
    s = torch.randn(b, k, c, h, w, generator=g)
    fg = torch.rand(b, k, 1, h, w, generator=g)
    fg = torch.where(fg < 0.6, torch.zeros_like(fg), fg)  # partial cells, and cells the mask misses
    fg[1, 2] = 0.0  # an empty shot
    prior = masked_cosine_prior(q, s, fg)
    expected = naive_prior(q, s, fg)
    assert prior.shape == (b, 1, h, w)
    torch.testing.assert_close(prior.double(), expected, atol=1e-5, rtol=0)
    # K shots: the mean of the one-shot priors; an empty shot contributes a map of zeros
    alone = [masked_cosine_prior(q, s[:, i : i + 1], fg[:, i : i + 1]) for i in range(k)]
    torch.testing.assert_close(prior, torch.stack(alone).mean(0))
    assert torch.equal(alone[2][1], torch.zeros(1, h, w))


def test_prototype_is_the_plain_mean_of_the_shots_masked_averages():
    fs = torch.randn(1, 2, 3, 4, 4)
    fg = torch.zeros(1, 2, 1, 4, 4)
    fg[0, 0, 0, :1, :1] = 1.0  # one cell
    fg[0, 1, 0, 2:, :] = 0.5  # eight half cells
    first = fs[0, 0, :, 0, 0]
    second = fs[0, 1, :, 2:, :].mean(dim=(1, 2))
    torch.testing.assert_close(mean_prototype(fs, fg)[0], (first + second) / 2, atol=1e-5, rtol=0)


def test_area_pool_is_adaptive_average_pooling():
    x = torch.randn(2, 3, 27, 27)
    for size in [(27, 27), (14, 14), (7, 7), (4, 4), (5, 3)]:
        torch.testing.assert_close(area_pool(x, size), F.adaptive_avg_pool2d(x, size), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scales", [[1.0], [1.0, 0.5], [1.0, 0.5, 0.25, 0.1333], [0.5, 0.25]])
def test_fem_has_one_intermediate_output_per_scale(scales):
    torch.manual_seed(0)
    fem = FeatureEnrichment(8, PFENetConfig(scales=scales), 0.1).eval()
    fq, proto, prior = torch.randn(2, 8, 12, 12), torch.randn(2, 8), torch.rand(2, 1, 12, 12)
    merged, intermediate = fem(fq, proto, prior)
    assert len(intermediate) == len(scales) == len(fem.classifiers) == len(fem.merge)
    sizes = scale_sizes((12, 12), scales)
    assert [tuple(x.shape) for x in intermediate] == [(2, 2, *s) for s in sizes]
    assert merged.shape == (2, 8, *sizes[0])


@pytest.mark.parametrize("inter_scale", [True, False])
def test_inter_scale_path_runs_from_the_larger_scales_to_the_smaller(inter_scale):
    """Scale i's output depends on the enrichment of scale j <= i (top-down), never of a smaller scale;
    without the inter-scale interaction, on its own scale only."""
    torch.manual_seed(0)
    fem = FeatureEnrichment(8, PFENetConfig(scales=[1.0, 0.5, 0.25], inter_scale=inter_scale), 0.1).eval()
    _, intermediate = fem(torch.randn(2, 8, 12, 12), torch.randn(2, 8), torch.rand(2, 1, 12, 12))
    weights = [layer[0].weight for layer in fem.enrich]
    for i, out in enumerate(intermediate):
        grads = torch.autograd.grad(out.square().sum(), weights, retain_graph=True, allow_unused=True)
        for j, grad in enumerate(grads):
            reached = grad is not None and bool(grad.abs().sum() > 0)
            assert reached == (j == i or (inter_scale and j < i)), (i, j)


def test_intermediate_loss_is_the_weighted_mean_of_the_per_scale_cross_entropies():
    torch.manual_seed(0)
    target = torch.randint(0, 2, (2, 16, 16))
    target[:, :2] = 255
    scales = [torch.randn(2, 2, 16 // 2**i, 16 // 2**i) for i in range(3)]
    out = {"experts": {"pfenet": torch.randn(2, 2, 16, 16)}, "intermediate": scales}
    losses = dedn_loss(out, target, LossConfig(intermediate_ce=0.4), ["pfenet"])
    by_hand = [
        F.cross_entropy(F.interpolate(x, (16, 16), mode="bilinear"), target, ignore_index=255) for x in scales
    ]
    torch.testing.assert_close(losses["ce_intermediate"], 0.4 * sum(by_hand) / 3)
    main_ce = F.cross_entropy(out["experts"]["pfenet"], target, ignore_index=255)
    torch.testing.assert_close(losses["total"], main_ce + 0.4 * sum(by_hand) / 3)


def test_empty_support_predicts_background():
    model = pfenet().eval()
    query, supports, masks, _ = episode(k=2)
    with torch.no_grad():
        out = model(query, supports, torch.zeros_like(masks))
    assert out["empty_support"].all() and (out["logits"].argmax(1) == 0).all()


def test_checkpoint_reload_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    cfg = load_config(
        None, ["model.method=pfenet", "model.backbone=toy", "model.weights=null", "model.channels=16"]
    )
    model = FewShotSegmenter(cfg.model).eval()
    path = save_checkpoint(tmp_path / "m.pt", {"model": trainable_state(model), "config": to_dict(cfg)})
    torch.manual_seed(2)  # another initialisation, overwritten by the checkpoint
    loaded, digest = load_trained_model(cfg, str(path), torch.device("cpu"))
    assert len(digest) == 64
    query, supports, masks, _ = episode(k=3)
    with torch.no_grad():
        a, b = model(query, supports, masks), loaded(query, supports, masks)
    assert torch.equal(a["logits"], b["logits"])
    for x, y in zip(a["intermediate"], b["intermediate"], strict=True):
        assert torch.equal(x, y)
    # a DEDN checkpoint is not a PFENet model, and the other way round
    other = load_config(None, ["model.backbone=toy", "model.weights=null", "model.channels=16"])
    with pytest.raises(CheckpointError, match="model.method: checkpoint 'pfenet', config 'dedn'"):
        load_trained_model(other, str(path), torch.device("cpu"))


def test_train_evaluate_predict_from_the_command_line(tmp_path):
    from dedn.data.episodes import read_episodes
    from dedn.engine.benchmark import build_benchmark
    from dedn.engine.evaluate import evaluate_episodes
    from dedn.predict import Predictor
    from usage_helpers import scene, train_and_evaluate

    records, ckpt, results = train_and_evaluate(tmp_path, [*TINY, "model.method=pfenet"])
    out = tmp_path / "eval"
    trained = [r for r in records if "loss/total" in r]
    assert trained and all(r["loss/ce_intermediate"] > 0 and r["loss/ce_pfenet"] > 0 for r in trained)
    assert results["method"] == "pfenet" and results["experts"] == {}  # one method, reported alone
    assert len(results["per_seed"]) == 2 and 0.0 <= results["summary"]["miou"]["mean"] <= 1.0
    assert (out / "results.md").read_text().startswith("# pfenet")
    # the reloaded checkpoint scores exactly what `dedn eval` reported
    cfg = load_config(None, [*TINY, "model.method=pfenet"])
    model, _ = load_trained_model(cfg, str(ckpt), torch.device("cpu"))
    bench = build_benchmark(cfg.data, progress=False)
    episodes, _ = read_episodes(results["per_seed"][0]["episode_file"])
    metric = evaluate_episodes(
        model, bench.test_source, episodes, bench.split.novel, 64, torch.device("cpu"), progress=False
    )
    assert metric.compute()["miou"] == results["per_seed"][0]["miou"]
    # Predictor (dedn predict, the app) takes the checkpoint as it is
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    support, mask = scene(seed=1)
    query, _ = scene(seed=2)
    prediction = predictor.predict(query, support, mask, return_experts=True)
    assert prediction.mask.shape == query.shape[:2] and list(prediction.experts) == ["pfenet"]
    assert prediction.fusion_weights is None


def test_pfenet_offline_config_is_the_table_config_with_the_method_its_rate_and_length_changed():
    pfenet_cfg = load_config(REPO / "configs" / "pfenet_offline.yaml")
    # PFENet's own learning rate and length, chosen on pseudo-novel validation (issue 40), with one
    # validation at the end
    own = ["train.lr=0.04", "train.steps=3250", "train.val_every=3250"]
    table = load_config(REPO / "configs" / "pascal_offline.yaml", ["model.method=pfenet", *own])
    assert pfenet_cfg.model.method == "pfenet"
    a, b = flatten(to_dict(pfenet_cfg)), flatten(to_dict(table))
    assert sorted(k for k in a if a[k] != b[k]) == ["name", "output_dir"]
    # so a model trained by the table's pfenet row is scored with this config, and the other way round
    check_compatible(table, pfenet_cfg, "a pfenet row model")
    assert scale_sizes((27, 27), pfenet_cfg.model.pfenet.scales) == [(27, 27), (14, 14), (7, 7), (4, 4)]


@pytest.mark.parametrize("scales", ["[]", "[0.5, 1.0]", "[1.5]", "[1.0, 0.0]", "[1.0, 1.0]"])
def test_bad_scales_are_refused(scales):
    with pytest.raises(ConfigError, match="model.pfenet.scales"):
        load_config(None, ["model.method=pfenet", f"model.pfenet.scales={scales}"])


def test_negative_intermediate_weight_is_refused():
    with pytest.raises(ConfigError, match="loss.intermediate_ce"):
        load_config(None, ["loss.intermediate_ce=-1"])


def test_onnx_export_matches_pytorch(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from usage_helpers import assert_onnx_matches

    torch.manual_seed(0)
    model = FewShotSegmenter(ModelConfig(method="pfenet", backbone="toy", weights=None, channels=16)).eval()
    # 80 px: a 10 x 10 grid pooled to 10, 5, 3 and 1 cells (3 does not divide 10: the pooling must be
    # traceable for any sizes)
    assert_onnx_matches(model, tmp_path / "pfenet.onnx", shots=2, size=80)
