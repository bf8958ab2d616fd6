"""BAM as a peer method (model.method = bam): the Gram difference, the base-class map, the ensemble, the
base learner's training and its freezing, and training / evaluation through the project's commands."""

import numpy as np
import pytest
import torch

from dedn.cli import main
from dedn.config import BAMConfig, ModelConfig, load_config
from dedn.engine.checkpoint import load_trained_model
from dedn.errors import ConfigError
from dedn.losses import dedn_loss
from dedn.models.bam import base_label_table, gram_difference, train_base_learner
from dedn.models.network import FewShotSegmenter
from dedn.models.ops import gram_matrix
from dedn.models.toy import ToyBackbone
from test_engine import TINY
from test_model import episode

BAM_TINY = [*TINY, "model.method=bam", "train.feature_cache=true", "model.bam.base_steps=4"]


def bam(**settings) -> FewShotSegmenter:
    return FewShotSegmenter(ModelConfig(method="bam", channels=16, bam=BAMConfig(**settings)), ToyBackbone())


def test_gram_difference_equals_the_direct_computation():
    g = torch.Generator().manual_seed(0)
    q, s = torch.randn(2, 5, 4, 3, generator=g), torch.randn(2, 3, 5, 4, 3, generator=g)
    got = gram_difference(q, s)
    assert got.shape == (2, 3)
    for b in range(2):
        for k in range(3):
            fq, fs = q[b].reshape(5, -1), s[b, k].reshape(5, -1)
            total = 0.0
            for i in range(5):
                for j in range(5):
                    cq = float(fq[i] @ fq[j] / (fq[i].norm() * fq[j].norm()))
                    cs = float(fs[i] @ fs[j] / (fs[i].norm() * fs[j].norm()))
                    total += (cq - cs) ** 2
            assert got[b, k].item() == pytest.approx(total**0.5 / 5, rel=1e-5)
    # a scene compared with itself differs by nothing; channel scale does not matter (cosines)
    assert torch.allclose(gram_difference(q, (3 * q).unsqueeze(1)), torch.zeros(2, 1), atol=1e-5)
    assert torch.allclose(torch.diagonal(gram_matrix(q), dim1=1, dim2=2), torch.ones(2, 5))


def test_base_label_table_maps_base_classes_and_keeps_ignore():
    table = base_label_table([6, 9, 12])
    labels = np.array([0, 6, 9, 12, 3, 30, 255])  # 3: another class; 30: a background pseudo-class
    assert table[labels].tolist() == [0, 1, 2, 3, 0, 0, 255]


def test_base_map_leaves_the_episodes_own_class_out():
    model = bam(base_classes=3).eval()
    head = model.experts["bam"]
    head.base_ids.copy_(torch.tensor([6, 9, 12]))
    mid = torch.randn(2, head.base.reduce[0].in_channels, 6, 6)
    probs = head.base(mid).softmax(dim=1)
    every = head.base_map(mid, None)
    assert torch.allclose(every, probs[:, 1:].sum(dim=1, keepdim=True))
    left_out = head.base_map(mid, torch.tensor([9, 5]))  # 9 is base class 2; 5 is not a base class
    assert torch.allclose(left_out[0], (probs[0, 1] + probs[0, 3]).unsqueeze(0))
    assert torch.allclose(left_out[1], every[1])


@pytest.mark.parametrize("k", [1, 3])
def test_shapes_and_gradients_reach_the_meta_learner_not_the_frozen_base_learner(k):
    torch.manual_seed(0)
    model = bam(shots=3).train()
    query, supports, masks, target = episode(k=k)
    out = model(query, supports, masks, class_ids=torch.tensor([6, 7]))
    assert out["logits"].shape == (2, 2, 48, 48) and len(out["intermediate"]) == 1
    assert out["aux"]["gram"].shape == (2,) and out["aux"]["base"].shape[1] == 1
    losses = dedn_loss(out, target, load_config(None).loss, model.expert_names)
    assert set(losses) == {"ce_bam", "ce_intermediate", "total"}
    losses["total"].backward()
    head = model.experts["bam"]
    for name, p in head.named_parameters():
        if name.startswith("base."):
            assert not p.requires_grad and p.grad is None, name
        elif name.startswith("kshot."):
            # used only at its own K; there, it is in the graph (its gradient is 0 at initialisation:
            # the merge's weight on psi starts at 0, as BAM's)
            assert (p.grad is None) == (k != 3)
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_ensemble_starts_as_the_meta_learner_minus_nothing_but_the_base_map():
    """At initialisation both merges pass the meta probability through (weights [1, 0]): the output is
    [p_bg, p_fg] of the meta learner, whatever the Gram difference and the base map."""
    torch.manual_seed(0)
    model = bam().eval()
    query, supports, masks, _ = episode()
    feats = model.encode(query)
    sfeats = {n: t.unsqueeze(1) for n, t in model.encode(supports[:, 0]).items()}
    out = model.forward_features(feats, sfeats, masks, tuple(feats["mid"].shape[-2:]))
    meta = out["intermediate"][0].softmax(dim=1)
    assert torch.allclose(out["logits"], meta, atol=1e-6)


def test_k_shot_weighting_starts_as_the_mean_and_falls_back_to_it_at_another_k():
    head = bam(shots=3).experts["bam"]
    d = torch.tensor([[0.3, 0.1, 0.2]])
    assert head.shot_difference(d).item() == pytest.approx(0.2)
    with torch.no_grad():
        head.kshot.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))  # weight the smallest difference
    assert head.shot_difference(d).item() == pytest.approx(0.1, abs=0.01)
    assert head.shot_difference(torch.tensor([[0.3, 0.1]])).item() == pytest.approx(0.2)


def test_base_learner_training_learns_the_labels_and_freezes_it():
    torch.manual_seed(0)
    model = bam(base_classes=2, base_steps=40, base_batch=4, base_lr=0.05)
    head = model.experts["bam"]
    g = torch.Generator().manual_seed(0)
    c = head.base.reduce[0].in_channels  # every mid-level channel
    mids = {f"i{i}": torch.randn(c, 8, 8, generator=g) for i in range(6)}
    for m in mids.values():  # class 4 where channel 0 is high, class 7 where channel 1 is
        m[0] += 3.0 * (torch.arange(8) < 4).float().view(1, 8)
        m[1] += 3.0 * (torch.arange(8) >= 4).float().view(8, 1)
    labels = {}
    for key, m in mids.items():
        lab = torch.zeros(8, 8, dtype=torch.long)
        lab[m[0] > 1.5] = 4
        lab[m[1] > 1.5] = 7
        lab[0, 0] = 255
        labels[key] = lab
    before = [p.clone() for p in head.base.parameters()]
    train_base_learner(
        head, labels, lambda i: {"mid": mids[i]}, [4, 7], head.cfg, 0, 8, 0.5, torch.device("cpu")
    )
    assert head.base_ids.tolist() == [4, 7]
    assert all(not p.requires_grad for p in head.base.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, head.base.parameters(), strict=True))
    with torch.no_grad():
        pred = head.base(torch.stack(list(mids.values()))).argmax(dim=1)
    table = torch.from_numpy(base_label_table([4, 7]))
    target = table[torch.stack(list(labels.values()))]
    valid = target != 255
    assert (pred[valid] == target[valid]).float().mean() > 0.9


def test_a_benchmark_with_another_number_of_base_classes_is_refused():
    head = bam(base_classes=3).experts["bam"]
    with pytest.raises(ConfigError, match="model.bam.base_classes = 3.*set model.bam.base_classes=2"):
        train_base_learner(head, {}, None, [1, 2], head.cfg, 0, 8, 0.5, torch.device("cpu"))


def test_bam_needs_the_feature_cache(tmp_path):
    sets = [a for s in [*TINY, "model.method=bam"] for a in ("--set", s)]
    assert main(["train", "--quiet", "--output", str(tmp_path), *sets]) == 2


def test_train_and_evaluate_from_the_command_line(tmp_path):
    from usage_helpers import train_and_evaluate

    records, ckpt, results = train_and_evaluate(tmp_path, BAM_TINY)
    assert any("base_learner_seconds" in r for r in records)
    trained = [r for r in records if "loss/total" in r]
    assert trained and all(r["loss/ce_bam"] > 0 and r["loss/ce_intermediate"] > 0 for r in trained)
    model, _ = load_trained_model(load_config(None, BAM_TINY), str(ckpt), torch.device("cpu"))
    assert model.experts["bam"].base_ids.tolist() == list(range(6, 21))  # the fold's base classes
    assert results["method"] == "bam" and 0.0 <= results["summary"]["miou"]["mean"] <= 1.0


def test_bam_offline_config_is_the_table_config_with_the_method_and_its_length_changed():
    from pathlib import Path

    from dedn.config import flatten, to_dict
    from dedn.engine.checkpoint import check_compatible

    repo = Path(__file__).resolve().parents[1]
    bam_cfg = load_config(repo / "configs" / "bam_offline.yaml")
    # BAM's own length, chosen on pseudo-novel validation (issue 40), with one validation at its end
    length = ["train.steps=2750", "train.val_every=2750"]
    table = load_config(repo / "configs" / "pascal_offline.yaml", ["model.method=bam", *length])
    a, b = flatten(to_dict(bam_cfg)), flatten(to_dict(table))
    assert bam_cfg.model.method == "bam"
    assert sorted(k for k in a if a[k] != b[k]) == ["name", "output_dir"]
    # a model of the table's bam row is scored with this config (and with camvid_cross.yaml's
    # --set model.method=bam), and the other way round
    check_compatible(table, bam_cfg, "a bam row model")
    camvid = load_config(repo / "configs" / "camvid_cross.yaml", ["model.method=bam"])
    check_compatible(camvid, bam_cfg, "a bam model on CamVid")
