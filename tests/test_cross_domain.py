"""The cross-domain path: the label-map reader, the `cross` protocol, scoring a checkpoint trained
elsewhere on it, and the background pseudo-classes of training (all on tiny trees made in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dedn.cli import main
from dedn.config import DataConfig, load_config
from dedn.data.base import IGNORE_INDEX
from dedn.data.labelmap import LabelMapSource
from dedn.data.protocol import cross_domain_split
from dedn.data.pseudo_classes import (
    assign_background,
    fit_part_classes,
    fit_pseudo_classes,
    pseudo_class_pairs,
    spherical_kmeans,
)
from dedn.engine.benchmark import build_benchmark
from dedn.errors import ConfigError, DataError
from usage_helpers import make_checkpoint, toy_config

CLASSES = ["sky", "road", "car"]


def make_labelmap(root: Path, n: int = 6, void: int = 0, first: int = 1, size=(40, 48)) -> Path:
    """``n`` images whose labels show every class in bands (top: class 1, middle: 2, a car box: 3) and a
    void border row; ``test.txt`` lists the first half, ``val.txt`` the rest."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    h, w = size
    rng = np.random.default_rng(0)
    ids = [f"f{i:03d}" for i in range(n)]
    for k, image_id in enumerate(ids):
        label = np.full((h, w), first, dtype=np.uint8)  # sky
        label[h // 2 :] = first + 1  # road
        label[h // 2 : h // 2 + 10, 5 + k : 25 + k] = first + 2  # a car
        label[0] = void
        Image.fromarray(label, mode="L").save(root / "labels" / f"{image_id}.png")
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"{image_id}.jpg")
    (root / "test.txt").write_text("\n".join(ids[: n // 2]) + "\n")
    (root / "val.txt").write_text("\n".join(ids[n // 2 :]) + "\n")
    return root


def test_labelmap_reader_maps_classes_and_void(tmp_path):
    root = make_labelmap(tmp_path / "camvid")
    source = LabelMapSource(root, split="test")
    assert source.class_names == CLASSES and source.ids == ["f000", "f001", "f002"]
    label = source.load_label("f000")
    assert label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {1, 2, 3, IGNORE_INDEX}
    assert (label[0] == IGNORE_INDEX).all() and label[5, 0] == 1 and label[-1, -1] == 2
    assert source.load_pair("f001")[0].shape == (40, 48, 3)
    assert len(LabelMapSource(root).ids) == 6  # no split: every label


def test_labelmap_reader_cityscapes_style_values(tmp_path):
    """Class values from 0 with 255 as void (Cityscapes trainIds) give the same global labels."""
    a = LabelMapSource(make_labelmap(tmp_path / "a"), void=[0], first_class_value=1)
    b = LabelMapSource(make_labelmap(tmp_path / "b", void=255, first=0), void=[255], first_class_value=0)
    for image_id in a.ids:
        assert np.array_equal(a.load_label(image_id), b.load_label(image_id))
    assert a.fingerprint() != b.fingerprint()  # the reading enters the cache key


def test_labelmap_background_value_is_background_in_every_episode(tmp_path):
    """``background: [0]`` (Clothing Co-Parsing's photo background): 0 becomes label 0, neither a class
    (no pairs, no episodes) nor void (it is scored as background); without it the same 0 is void."""
    root = make_labelmap(tmp_path / "ccp")  # row 0 holds the value 0
    source = LabelMapSource(root, void=[], background=[0])
    label = source.load_label("f000")
    assert (label[0] == 0).all() and set(np.unique(label).tolist()) == {0, 1, 2, 3}
    assert source.fingerprint() != LabelMapSource(root).fingerprint()
    cfg = DataConfig(benchmark="labelmap", root=str(root), protocol="cross", test_split="test", min_pixels=10)
    cfg.labelmap.void, cfg.labelmap.background = [], [0]
    bench = build_benchmark(cfg)
    assert sorted({p.class_id for p in bench.split.test_pairs}) == [1, 2, 3]
    # data.min_class_images: a class needs that many images, and at K shots also K + 1
    cfg.min_class_images = 3
    assert build_benchmark(cfg).split.novel == [1, 2, 3]  # every class is in the 3 test images
    cfg.shots = 3
    with pytest.raises(DataError, match="no class of the cross-domain set has 4 images"):
        build_benchmark(cfg)
    from dedn.data.episodes import binarize

    mask = binarize(label, 3, 255)
    assert (mask[0] == 0).all() and 255 not in mask  # background, not ignored
    with pytest.raises(DataError, match="also class values"):
        LabelMapSource(root, void=[], background=[2])
    with pytest.raises(DataError, match="both void and background"):
        LabelMapSource(root, void=[0], background=[0])
    with pytest.raises(DataError, match="negative"):
        LabelMapSource(root, void=[], background=[-1])


def test_labelmap_reader_errors_name_the_file(tmp_path):
    root = make_labelmap(tmp_path / "set")
    bad = np.full((40, 48), 9, dtype=np.uint8)
    Image.fromarray(bad, mode="L").save(root / "labels" / "f001.png")
    with pytest.raises(DataError, match=r"f001\.png has values \[9\]"):
        LabelMapSource(root).load_label("f001")
    (root / "images" / "f002.jpg").unlink()
    with pytest.raises(DataError, match="have no image in .*images.*'f002'"):
        LabelMapSource(root)
    with pytest.raises(DataError, match="split list 'train' not found"):
        LabelMapSource(root, split="train")
    with pytest.raises(DataError, match="also class values"):
        LabelMapSource(root, void=[1])
    (root / "classes.txt").write_text("sky\nroad\nsky\n")
    with pytest.raises(DataError, match="'sky' is listed twice"):
        LabelMapSource(root)
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="classes.txt not found"):
        LabelMapSource(root)


def test_cross_protocol_every_class_is_novel_and_nothing_is_trained(tmp_path):
    counts = {"a": {1: 5000, 2: 100}, "b": {2: 3000, 3: 2048}}
    split = cross_domain_split(counts, [1, 2, 3])
    assert split.protocol == "cross" and split.base == [] and not split.train_pairs and not split.val_pairs
    assert [(p.image_id, p.class_id) for p in split.test_pairs] == [("a", 1), ("b", 2), ("b", 3)]

    root = make_labelmap(tmp_path / "set", size=(80, 96))
    cfg = DataConfig(
        benchmark="labelmap", root=str(root), protocol="cross", test_split="test", min_pixels=100
    )
    bench = build_benchmark(cfg)
    assert bench.split.novel == [1, 2, 3]
    assert {p.class_id for p in bench.split.test_pairs} == {1, 2, 3}
    with pytest.raises(ConfigError, match="data.protocol = cross"):
        build_benchmark(DataConfig(benchmark="labelmap", root=str(root), protocol="disjoint"))


def _write_config(tmp_path: Path, root: Path) -> Path:
    config = tmp_path / "cross.yaml"
    config.write_text(
        "data:\n  benchmark: labelmap\n  root: " + str(root) + "\n  protocol: cross\n  test_split: test\n"
        "  image_size: 64\n  min_pixels: 100\nmodel:\n  backbone: toy\n  weights: null\n  channels: 16\n"
        "eval:\n  episodes: 6\n  seeds: [0]\n"
    )
    return config


def test_a_checkpoint_trained_elsewhere_is_scored_on_the_cross_domain_set(tmp_path):
    """End to end through the CLI: a checkpoint of another benchmark (here: a toy DEDN), the trained
    model with the matcher in AWF, and `proto`, on the same episode file; training on it is refused."""
    root = make_labelmap(tmp_path / "set", size=(80, 96))
    config = _write_config(tmp_path, root)
    ckpt = make_checkpoint(tmp_path / "dedn.pt", toy_config(image_size=64))
    episodes = tmp_path / "episodes"
    common = ["--quiet", "--set", f"eval.episode_dir={episodes}"]
    out = tmp_path / "dedn"
    assert main(["eval", str(config), "--checkpoint", str(ckpt), "--output", str(out), *common,
                 "--set", "model.fusion.matcher=proto"]) == 0  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    assert result["settings"]["protocol"] == "cross"
    assert {"object", "scenario", "matcher=proto"} <= set(result["experts"])
    assert main(["eval", str(config), "--set", "model.method=proto", "--output", str(tmp_path / "proto"),
                 *common]) == 0  # fmt: skip
    proto = json.loads((tmp_path / "proto" / "results.json").read_text())
    # the matcher inside DEDN is the proto baseline, on the same episodes
    matcher = result["experts"]["matcher=proto"]["miou"]["mean"]
    assert proto["summary"]["miou"]["mean"] == pytest.approx(matcher)
    assert len(list(episodes.glob("*.json"))) == 1
    assert main(["train", str(config), "--quiet", "--output", str(tmp_path / "train")]) == 2


def test_pseudo_class_config_is_checked():
    with pytest.raises(ConfigError, match="fraction"):
        load_config(None, ["train.pseudo_classes.fraction=1.5"])
    with pytest.raises(ConfigError, match="feature_cache"):
        load_config(None, ["train.pseudo_classes.fraction=0.3", "train.feature_cache=false"])
    with pytest.raises(ConfigError, match="model.fusion.matcher"):
        load_config(None, ["model.fusion.matcher=nearest"])


def test_spherical_kmeans_finds_separated_directions_deterministically():
    g = torch.Generator().manual_seed(0)
    axes = torch.eye(8)[:3]
    noise = 0.05 * torch.randn(150, 8, generator=g)
    x = torch.nn.functional.normalize(axes.repeat_interleave(50, 0) + noise, dim=1)
    centres = spherical_kmeans(x, 3, seed=1)
    assert torch.equal(centres, spherical_kmeans(x, 3, seed=1))
    # each axis has one centre within a few degrees of it
    assert (centres @ axes.T).max(dim=0).values.min() > 0.99
    with pytest.raises(DataError, match="cannot form 4"):
        spherical_kmeans(x[:3], 4, seed=0)


def _two_region_image(split_col: int, size: int = 32, grid: int = 8):
    """High features (2, grid, grid): direction e0 left of ``split_col`` cells, e1 right of it; a label
    (size, size) whose centre square is an object (class 1) and the rest background."""
    high = torch.zeros(2, grid, grid)
    high[0, :, :split_col] = 1.0
    high[1, :, split_col:] = 1.0
    label = torch.zeros(size, size, dtype=torch.long)
    label[12:20, 12:20] = 1
    return high, label


def test_background_pseudo_classes_follow_the_features_and_leave_objects_alone():
    high, label = _two_region_image(4)
    centres = torch.eye(2)
    out = assign_background(high, label, centres, first_id=21)
    assert torch.equal(out[12:20, 12:20], label[12:20, 12:20])  # the object keeps its class
    assert out[0, 0] == 21 and out[0, -1] == 22  # left region: centre 0, right: centre 1
    pairs = pseudo_class_pairs({"a": out}, [21, 22], min_pixels=100)
    assert pairs == {21: ["a"], 22: ["a"]}
    assert pseudo_class_pairs({"a": out}, [21, 22], min_pixels=10_000) == {}


def test_positional_clusters_at_the_border_are_not_pseudo_classes():
    """A third direction on the outer ring of cells only (as padding leaves in conv features) forms its own
    cluster, which is dropped: its pixels stay background and it gets no pairs."""
    feats, labels = [], {}
    for i in range(6):
        high, label = _two_region_image(2 + i % 4)
        ring = torch.zeros(8, 8, dtype=torch.bool)
        ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
        high = torch.cat([high, torch.zeros(1, 8, 8)])
        high[:, ring] = torch.tensor([0.0, 0.0, 1.0])[:, None]
        feats.append((f"im{i}", high))
        labels[f"im{i}"] = label
    relabelled, pairs, centres = fit_pseudo_classes(feats, labels, k=3, first_id=21, seed=0, min_pixels=20)
    assert centres.shape == (3, 3)
    ring_id = 21 + int((centres @ torch.tensor([0.0, 0.0, 1.0])).argmax())
    assert ring_id not in pairs and len(pairs) == 2
    for image_id, lab in relabelled.items():
        assert not (lab == ring_id).any()
        assert torch.equal(lab[12:20, 12:20], labels[image_id][12:20, 12:20])
        assert lab[0, 0] == 0  # the corner is border: background


def test_part_classes_split_each_class_and_leave_the_rest_alone():
    """Each class's pixels are split by the features of its own cells (here: left and right halves of an
    object whose two halves point in two directions); other pixels keep their label; part ids follow
    ``first_id`` class by class; a part below ``min_pixels`` forms no pair."""
    feats, labels = [], {}
    for i in range(3):
        high = torch.zeros(3, 8, 8)
        high[2] = 1.0  # background direction
        high[:, 2:6, 2:4] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # left half of the object
        high[:, 2:6, 4:6] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # right half
        label = torch.zeros(32, 32, dtype=torch.long)
        label[8:24, 8:24] = 5
        label[0:2, 30:32] = 7  # a small second class: no whole cell, so not split
        feats.append((f"im{i}", high))
        labels[f"im{i}"] = label
    relabelled, pairs = fit_part_classes(feats, labels, [5, 7], parts=2, first_id=30, seed=0, min_pixels=20)
    for image_id, lab in relabelled.items():
        inside = lab[8:24, 8:24]
        assert set(inside.unique().tolist()) == {30, 31}  # class 5 (first of [5, 7]) -> parts 30, 31
        assert inside[:, :3].unique().numel() == 1 and inside[:, -3:].unique().numel() == 1
        assert inside[0, 0] != inside[0, -1]  # the two halves are two parts
        assert torch.equal(lab[0:2, 30:32], labels[image_id][0:2, 30:32])  # class 7 is not split
        assert (lab[24:] == 0).all()  # background stays background
    assert sorted(pairs) == [30, 31] and pairs[30] == ["im0", "im1", "im2"]
    with pytest.raises(DataError, match="ignore label 255"):
        fit_part_classes(feats, labels, [5, 7], parts=120, first_id=30, seed=0, min_pixels=20)


def test_part_episodes_are_drawn_at_their_share_with_masks_of_one_part(tmp_path):
    """part_fraction: that share of the training episodes asks for one part of a training class (ids after
    the background pseudo-classes), its masks cut from the part label maps; the other episodes are those
    of a run without parts."""
    from dedn.engine.train import FeatureEpisodes, Trainer
    from test_engine import tiny_config

    with pytest.raises(ConfigError, match="expected below 1"):
        load_config(None, ["train.pseudo_classes.fraction=0.5", "train.pseudo_classes.part_fraction=0.5",
                           "train.feature_cache=true"])  # fmt: skip
    with pytest.raises(ConfigError, match="parts = 1"):
        load_config(None, ["train.pseudo_classes.part_fraction=0.2", "train.pseudo_classes.parts=1",
                           "train.feature_cache=true"])  # fmt: skip

    def episodes(*extra):
        cfg = tiny_config(tmp_path, "train.feature_cache=true", "train.pseudo_classes.fraction=0.2",
                          "train.pseudo_classes.clusters=4", "data.min_pixels=64", *extra)  # fmt: skip
        trainer = Trainer(cfg, tmp_path, torch.device("cpu"), progress=False)
        return trainer, FeatureEpisodes(
            trainer.model, trainer.bench.train_source, trainer.by_class, 1, 64, 0.5, cfg.train.seed,
            torch.device("cpu"), False, None, 0.0, cfg.train.pseudo_classes,
            trainer.bench.train_source.num_classes, cfg.data.min_pixels,
        )  # fmt: skip

    trainer, plain = episodes()
    _, fe = episodes("train.pseudo_classes.part_fraction=0.4", "train.pseudo_classes.parts=2")
    n_classes = trainer.bench.train_source.num_classes
    assert fe.first_part_id == n_classes + 1 + 4 and min(fe.part_by_class) >= fe.first_part_id
    drawn = [fe.episode(i) for i in range(200)]
    parts = [i for i, e in enumerate(drawn) if e.class_id >= fe.first_part_id]
    assert 55 < len(parts) < 105
    before = [plain.episode(i) for i in range(200)]
    same = [i for i, e in enumerate(drawn) if e.class_id <= n_classes]
    assert same and all(drawn[i] == before[i] for i in same)
    ep = drawn[parts[0]]
    batch = fe.batch([parts[0]], torch.device("cpu"))
    part_px = (fe.part_labels[ep.query] == ep.class_id).sum()
    assert (batch["query_mask"] == 1).sum() == part_px > 0
    whole = sum(int((fe.labels[ep.query] == c).sum()) for c in trainer.by_class)
    assert part_px < whole  # a part, not the objects


def test_training_with_pseudo_classes_draws_them_at_the_given_share(tmp_path):
    """A tiny synthetic training run with half of its episodes on pseudo-classes: those episodes use ids
    after the benchmark's classes and masks from the relabelled background; the others are exactly the
    episodes of a run without pseudo-classes; a resumed seed gives the same clusters."""
    from dedn.data.episodes import train_episode
    from dedn.engine.train import FeatureEpisodes, Trainer
    from test_engine import tiny_config

    cfg = tiny_config(tmp_path, "train.feature_cache=true", "train.pseudo_classes.fraction=0.5",
                      "train.pseudo_classes.clusters=4", "data.min_pixels=64")  # fmt: skip
    trainer = Trainer(cfg, tmp_path, torch.device("cpu"), progress=False)

    def episodes():
        return FeatureEpisodes(
            trainer.model, trainer.bench.train_source, trainer.by_class, 1, 64, 0.5, cfg.train.seed,
            torch.device("cpu"), False, None, 0.0, cfg.train.pseudo_classes,
            trainer.bench.train_source.num_classes, cfg.data.min_pixels,
        )  # fmt: skip

    fe = episodes()
    n_classes = trainer.bench.train_source.num_classes
    assert fe.pseudo_by_class and min(fe.pseudo_by_class) > n_classes
    drawn = [fe.episode(i) for i in range(200)]
    pseudo = [e for e in drawn if e.class_id > n_classes]
    assert 70 < len(pseudo) < 130
    real = [(i, e) for i, e in enumerate(drawn) if e.class_id <= n_classes]
    assert all(e == train_episode(trainer.by_class, 1, cfg.train.seed, i) for i, e in real)
    batch = fe.batch([drawn.index(pseudo[0])], torch.device("cpu"))
    assert (batch["query_mask"] == 1).any() and (batch["support_masks"] == 1).any()
    again = episodes()
    assert all(torch.equal(again.labels[k], fe.labels[k]) for k in fe.labels)
    trainer.fit()
    assert (tmp_path / "checkpoints" / "best.pt").is_file()


def test_cross_domain_table_averages_the_fold_models(tmp_path):
    """scripts/cross_domain_table.py: each fold's checkpoint scored with the default fusion (the probe) and
    round 12's, proto and prior once, the table the mean over the fold models; finished runs are not
    repeated."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    root = make_labelmap(tmp_path / "set", size=(80, 96))
    config = _write_config(tmp_path, root)
    for fold in (0, 1):
        make_checkpoint(tmp_path / f"m{fold}.pt", toy_config(image_size=64), seed=fold)
    out = tmp_path / "table"
    args = [sys.executable, str(repo / "scripts" / "cross_domain_table.py"), "--config", str(config),
            "--checkpoint", str(tmp_path / "m{fold}.pt"), "--folds", "0", "1", "--seeds", "0", "1",
            "--episodes", "4", "--out", str(out), "--previous", "--matcher", "probe", "ridge"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, cwd=repo)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((out / "table.json").read_text())["rows"]
    previous = "dedn (round 12: AWF + proto, confidence)"
    probe = "probe (training-free, fitted to the support)"
    ridge = "dedn (ridge probe)"
    assert {"proto", "prior", "dedn", previous, "dedn / object expert", probe, ridge} <= set(rows)
    assert "probe, ridge fit (training-free)" in rows
    assert not any("matcher=" in row for row in rows)
    runs = [json.loads((out / "eval" / f"dedn-probe-fold{f}" / "results.json").read_text()) for f in (0, 1)]
    expected = sum(r["summary"]["miou"]["mean"] for r in runs) / 2
    assert rows["dedn"]["miou"] == pytest.approx(expected)
    assert runs[0]["config"]["model"]["fusion"]["confidence"] is False
    assert runs[0]["config"]["model"]["fusion"]["probe"]["fit"] == "logistic"
    fits = json.loads((out / "eval" / "dedn-ridge-fold0" / "results.json").read_text())["config"]
    assert fits["model"]["fusion"]["probe"]["fit"] == "ridge"
    old = json.loads((out / "eval" / "dedn-previous-fold0" / "results.json").read_text())["config"]
    assert old["model"]["fusion"]["matcher"] == "proto" and old["model"]["fusion"]["confidence"] is True
    assert rows["dedn"]["models"] == 2 and rows["proto"]["models"] == 1
    assert "| method | mIoU | FB-IoU | sky | road | car |" in (out / "table.md").read_text()
    stamp = (out / "eval" / "proto" / "results.json").stat().st_mtime_ns
    assert subprocess.run(args, capture_output=True, cwd=repo).returncode == 0
    assert (out / "eval" / "proto" / "results.json").stat().st_mtime_ns == stamp


def test_unseen_picture_draws_every_member_the_fusions_and_proto(tmp_path):
    """scripts/unseen_picture.py: one row per episode, columns support, query, both experts, the probe, the
    fusion, round 12's fusion and proto."""
    import subprocess
    import sys

    from dedn.vis import grid_size

    repo = Path(__file__).resolve().parents[1]
    root = make_labelmap(tmp_path / "set", size=(80, 96))
    config = _write_config(tmp_path, root)
    text = config.read_text().replace("  channels: 16\n", "  channels: 16\n  fusion:\n    matcher: probe\n")
    config.write_text(text)
    ckpt = make_checkpoint(tmp_path / "dedn.pt", toy_config(image_size=64))
    out = tmp_path / "grid.png"
    done = subprocess.run(
        [sys.executable, str(repo / "scripts" / "unseen_picture.py"), "--config", str(config), "--checkpoint",
         str(ckpt), "--rows", "2", "--out", str(out)], capture_output=True, text=True, cwd=repo,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # support, query + truth, object, scenario, probe, fused, round 12, proto
    assert Image.open(out).size == grid_size(2, 8, 160)
