"""The on-disk feature store, the loss resolution and the fusion used in training."""

import dataclasses
import json
import os

import pytest
import torch

from dedn.cli import main
from dedn.data.episodes import sample_test_episodes
from dedn.data.transforms import TestTransform
from dedn.engine.benchmark import build_benchmark
from dedn.engine.checkpoint import load_trained_model, trainable_state
from dedn.engine.evaluate import evaluate_episodes
from dedn.engine.features import FeatureCache, ImageEncoder, build_feature_store, feature_store_key
from dedn.engine.train import Trainer
from dedn.models.network import FewShotSegmenter
from test_engine import TINY, tiny_config

CPU = torch.device("cpu")


def _store(tmp_path, cfg, model=None):
    model = model or FewShotSegmenter(cfg.model).eval()
    bench = build_benchmark(cfg.data)
    store = build_feature_store(model, bench.test_source, cfg.data.image_size, CPU, tmp_path / "s", False)
    return model, bench, store


def test_stored_features_equal_features_encoded_on_the_fly(tmp_path):
    cfg = tiny_config(tmp_path)
    model, bench, store = _store(tmp_path, cfg)
    ids = bench.test_source.ids
    assert len(store) == len(ids)
    encoder = ImageEncoder(model, CPU)
    transform = TestTransform(cfg.data.image_size)
    for image_id in ids[:: max(1, len(ids) // 7)]:
        fresh = encoder(image_id, lambda i=image_id: transform(bench.test_source.load_image(i))[0])
        stored = store.features(image_id)
        assert stored.keys() == fresh.keys()
        for key in fresh:
            assert torch.equal(stored[key], fresh[key]), (image_id, key)
    # an unknown id falls back to computing; a known one never does
    assert store.get("not-an-image", lambda: {"x": torch.ones(1)})["x"].item() == 1.0
    store.get(ids[0], lambda: pytest.fail("a stored image must not be encoded again"))
    assert store.hits == 1 and store.misses == 1


def test_store_is_reopened_not_rebuilt_and_keyed_by_settings(tmp_path):
    cfg = tiny_config(tmp_path)
    model, bench, store = _store(tmp_path, cfg)
    index = store.folder / "index.json"
    stamp = index.stat().st_mtime_ns
    again = build_feature_store(model, bench.test_source, cfg.data.image_size, CPU, tmp_path / "s", False)
    assert again.folder == store.folder and index.stat().st_mtime_ns == stamp
    other = build_feature_store(model, bench.test_source, 48, CPU, tmp_path / "s", False)
    assert other.folder != store.folder
    assert (
        other.features(bench.test_source.ids[0])["mid"].shape[-1]
        < store.features(bench.test_source.ids[0])["mid"].shape[-1]
    )
    # nothing but the two finished stores is left in the root (no temporary folders)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        [store.folder.name, other.folder.name]
    )


def test_evaluation_with_the_store_equals_evaluation_without(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=2", "train.feature_cache=true")
    Trainer(cfg, tmp_path, CPU, progress=False).fit()
    model, _ = load_trained_model(cfg, str(tmp_path / "checkpoints" / "last.pt"), CPU)
    _, bench, store = _store(tmp_path, cfg, model)
    episodes = sample_test_episodes(bench.split.test_pairs, 12, 2, seed=5)
    args = (model, bench.test_source, episodes, bench.split.novel, cfg.data.image_size, CPU)
    with_store = evaluate_episodes(*args, cache=store, progress=False)
    in_memory = evaluate_episodes(*args, cache=FeatureCache(), progress=False)
    assert store.hits > 0 and store.misses == 0
    for key in ("class_intersection", "class_union", "totals"):
        assert torch.equal(with_store.state_dict()[key], in_memory.state_dict()[key])


def test_training_from_the_store_equals_training_from_memory(tmp_path):
    opts = ["train.feature_cache=true", "train.steps=3"]
    a = Trainer(tiny_config(tmp_path / "a", *opts), tmp_path / "a", CPU, progress=False)
    a.fit()
    b_cfg = tiny_config(tmp_path / "b", *opts, f"feature_store={tmp_path / 'store'}")
    b = Trainer(b_cfg, tmp_path / "b", CPU, progress=False)
    assert b.store is not None and len(b.store) > 0
    b.fit()
    sa, sb = trainable_state(a.model), trainable_state(b.model)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert b.store.hits > 0  # the validation episodes read the store too


def test_features_command_builds_the_store(tmp_path, capsys):
    sets = [a for s in TINY for a in ("--set", s)]
    store = tmp_path / "store"
    assert main(["features", "--quiet", *sets, "--set", f"feature_store={store}"]) == 0
    out = capsys.readouterr().out
    (folder,) = list(store.iterdir())
    index = json.loads((folder / "index.json").read_text())
    assert str(len(index["ids"])) in out and set(index["names"]) == {"mid", "high"}
    # the thread count it was encoded with (it changes the features' last bits) is recorded
    assert index["threads"] == torch.get_num_threads()
    # and so is the instruction set PyTorch's kernels dispatch to (AVX2 and AVX-512 round differently)
    assert index["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_loss_size_trains_on_a_coarser_grid(tmp_path):
    cfg = tiny_config(tmp_path, "train.feature_cache=true", "train.loss_size=32", "train.steps=2")
    trainer = Trainer(cfg, tmp_path, CPU, progress=False)
    seen = []
    original = trainer._forward

    def spy(batch):
        out = original(batch)
        seen.append((tuple(out["logits"].shape[-2:]), tuple(batch["query_mask"].shape[-2:])))
        return out

    trainer._forward = spy
    trainer.fit()
    assert seen and all(s == ((32, 32), (32, 32)) for s in seen)
    assert trainer.step == 2


@pytest.mark.parametrize("train_mode", ["mean", "awf"])
def test_fusion_in_training_follows_train_mode(tmp_path, monkeypatch, train_mode):
    cfg = tiny_config(tmp_path, f"model.fusion.train_mode={train_mode}")
    model = FewShotSegmenter(cfg.model)
    calls = []
    real = model.support_scores
    monkeypatch.setattr(model, "support_scores", lambda *a: calls.append(1) or real(*a))
    b, k, s = 2, 2, cfg.data.image_size
    query, supports = torch.rand(b, 3, s, s), torch.rand(b, k, 3, s, s)
    masks = (torch.rand(b, k, s, s) > 0.5).long()
    model.train()
    out = model(query, supports, masks)
    assert len(calls) == (1 if train_mode == "awf" else 0)
    if train_mode == "mean":
        assert torch.allclose(out["fusion_weights"], torch.full((b, 2), 0.5))
    model.eval()
    model(query, supports, masks)  # at test time model.fusion.mode (awf) applies
    assert len(calls) == (2 if train_mode == "awf" else 1)


def test_a_model_trained_with_awf_can_be_scored_with_plain_averaging(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=2", "train.feature_cache=true")
    Trainer(cfg, tmp_path, CPU, progress=False).fit()
    mean = tiny_config(tmp_path, "model.fusion.mode=mean")
    model, _ = load_trained_model(mean, str(tmp_path / "checkpoints" / "last.pt"), CPU)
    assert model.cfg.fusion.mode == "mean"


def test_each_expert_of_a_fused_model_is_scored_too(tmp_path):
    from dedn.engine.evaluate import run_evaluation

    cfg = tiny_config(tmp_path, "train.steps=2", "train.feature_cache=true", "eval.seeds=[0]")
    Trainer(cfg, tmp_path, CPU, progress=False).fit()
    model, _ = load_trained_model(cfg, str(tmp_path / "checkpoints" / "last.pt"), CPU)
    forward = model.forward_features

    def scenario_is_the_fused_output(*args, **kwargs):
        out = forward(*args, **kwargs)
        out["experts"]["scenario"] = out["logits"].clone()
        return out

    model.forward_features = scenario_is_the_fused_output
    results = run_evaluation(cfg, model, CPU, tmp_path / "eval", progress=False)
    experts = results["experts"]
    assert set(experts) == {"object", "scenario", "fusion=mean", "fusion=gate"}
    assert experts["scenario"]["miou"] == results["summary"]["miou"]  # scored exactly like the output
    assert 0.0 <= experts["object"]["miou"]["mean"] <= 1.0
    text = (tmp_path / "eval" / "results.md").read_text()
    assert "object expert alone" in text and "scored with fusion=gate" in text
    # the fusions scored from the AWF model's pass equal the model scored with that fusion
    model.forward_features = forward
    awf = run_evaluation(cfg, model, CPU, tmp_path / "awf", progress=False)["experts"]
    for mode in ("mean", "gate"):
        other = tiny_config(tmp_path, "train.steps=2", "eval.seeds=[0]", f"model.fusion.mode={mode}")
        alone, _ = load_trained_model(other, str(tmp_path / "checkpoints" / "last.pt"), CPU)
        scored = run_evaluation(other, alone, CPU, tmp_path / mode, progress=False)["summary"]
        assert scored["miou"] == awf[f"fusion={mode}"]["miou"]
    single = tiny_config(tmp_path, "model.method=proto", "eval.seeds=[0]")
    proto = run_evaluation(single, FewShotSegmenter(single.model), CPU, tmp_path / "proto", progress=False)
    assert proto["experts"] == {}


@pytest.mark.parametrize("feature_cache", [True, False])
def test_negative_episodes_reach_training_with_background_targets(tmp_path, feature_cache):
    """train.negative_episodes: a share of the batches' queries get an all-background target (their
    supports show a class absent from the query); with 0 every query shows its episode's class."""
    empty_share = {}
    for p in (0.0, 0.5):
        cfg = tiny_config(
            tmp_path / str(p),
            "train.steps=4",
            "train.batch_size=6",
            f"train.feature_cache={str(feature_cache).lower()}",
            f"train.negative_episodes={p}",
            "train.val_episodes=0",
        )
        trainer = Trainer(cfg, tmp_path / str(p), CPU, progress=False)
        empty = []
        original = trainer._forward

        def spy(batch, original=original, empty=empty):
            empty.extend(((batch["query_mask"] == 1).flatten(1).sum(1) == 0).tolist())
            return original(batch)

        trainer._forward = spy
        trainer.fit()
        assert len(empty) == 24
        empty_share[p] = sum(empty) / len(empty)
    assert empty_share[0.0] == 0.0
    assert 0.2 <= empty_share[0.5] <= 0.8


def test_store_key_follows_the_weight_file_content_not_its_path_or_time(tmp_path):
    """A user's weight file enters the key by its bytes: a copy elsewhere, with another timestamp, keeps
    the store; the same path with other weights does not."""
    cfg = tiny_config(tmp_path)
    source = build_benchmark(cfg.data).test_source
    first = tmp_path / "a" / "resnet50.pth"
    first.parent.mkdir()
    first.write_bytes(bytes(range(256)) * 4)
    copy = tmp_path / "b" / "weights.pth"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    os.utime(copy, (1, 1))

    def key(weights):
        model_cfg = dataclasses.replace(cfg.model, weights=str(weights))
        return feature_store_key(source, model_cfg, cfg.data.image_size, [2], [3])

    assert key(first) == key(copy)
    copy.write_bytes(bytes([*range(1, 256), 0]) * 3 + bytes(range(256)))  # same size, other bytes
    assert key(first) != key(copy)


def test_a_store_keeps_high_as_normalised_mid_and_float16_halves_it(tmp_path, capsys):
    """With the same levels read as mid and high (the offline defaults), the store keeps mid only and
    derives high on reading, bit-identical in float32; float16 halves the bytes and stays within its
    rounding; --dry-run prints the size without encoding."""
    levels = ["model.mid_levels=[stage1, stage2]", "model.high_levels=[stage1, stage2]"]
    cfg = tiny_config(tmp_path, *levels)
    model, bench, store = _store(tmp_path, cfg)
    assert sorted(store.arrays) == ["mid"] and store.derived["high"]["normalize"] == [32, 48]
    encoder = ImageEncoder(model, CPU)
    transform = TestTransform(cfg.data.image_size)
    image_id = bench.test_source.ids[0]
    fresh = encoder(image_id, lambda: transform(bench.test_source.load_image(image_id))[0])
    stored = store.features(image_id)
    assert stored.keys() == fresh.keys() == {"mid", "high"}
    for key in fresh:
        assert torch.equal(stored[key], fresh[key]), key
    half = build_feature_store(
        model, bench.test_source, cfg.data.image_size, CPU, tmp_path / "s", False, "float16"
    )
    assert half.folder != store.folder and half.dtype == "float16"
    assert half.bytes_per_image * 2 == store.bytes_per_image
    again = half.features(image_id)
    assert again["mid"].dtype == torch.float32
    for key in fresh:
        torch.testing.assert_close(again[key], fresh[key], rtol=1e-3, atol=1e-3)
        assert not torch.equal(again[key], fresh[key])
    sets = [a for s in [*TINY, *levels, "feature_store_dtype=float16"] for a in ("--set", s)]
    assert main(["features", "--dry-run", *sets]) == 0
    out = capsys.readouterr().out
    assert f"{half.bytes_per_image / 1e6:.2f} MB per image" in out and "COCO-20i" in out
