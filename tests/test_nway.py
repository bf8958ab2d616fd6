"""Several classes at once: N-way episodes (PANet's protocol), their label maps and scoring, and the same
in a user's hands (Predictor.predict_classes, dedn predict --class)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dedn.cli import main
from dedn.data.episodes import Episode, add_ways, pairs_by_class, sample_test_episodes
from dedn.data.protocol import Pair
from dedn.engine.benchmark import build_benchmark
from dedn.engine.evaluate import evaluate_episodes, evaluate_nway_episodes, label_map
from dedn.errors import DataError
from dedn.models.network import FewShotSegmenter
from dedn.predict import Predictor
from usage_helpers import make_checkpoint, save_rgb, scene, toy_config


def _pairs() -> list[Pair]:
    # class 1: a-d, class 2: a, e, f (a holds both), class 3: g, h, class 4: b only
    rows = [
        ("a", 1),
        ("b", 1),
        ("c", 1),
        ("d", 1),
        ("a", 2),
        ("e", 2),
        ("f", 2),
        ("g", 3),
        ("h", 3),
        ("b", 4),
    ]
    return [Pair(image, cls) for image, cls in rows]


def test_added_ways_are_other_classes_with_their_own_supports():
    pairs = _pairs()
    first = sample_test_episodes([p for p in pairs if p.class_id == 1], 12, 1, seed=4)
    episodes = add_ways(first, pairs, 3, seed=4)
    pool = pairs_by_class(pairs)
    seen = set()
    for one, episode in zip(first, episodes, strict=True):
        assert episode[0] == one and len(episode) == 3  # the one-way episode is the first way
        classes = [way.class_id for way in episode]
        assert len(set(classes)) == 3
        assert one.query != "b" or 4 not in classes  # for query b, class 4 has no other image
        for way in episode[1:]:
            assert way.query == one.query and len(way.supports) == 1
            assert way.supports[0] in pool[way.class_id] and way.supports[0] != one.query
        seen.update(classes[1:])
    assert seen == {2, 3, 4}
    assert add_ways(first, pairs, 3, seed=4) == episodes  # a pure function of the seed
    assert add_ways(first, pairs, 3, seed=5) != episodes
    assert [e[0] for e in add_ways(first, pairs, 1, seed=4)] == first
    with pytest.raises(DataError, match="4-way episodes need 3 other class.*'b' of class 1; 2 have them"):
        add_ways(first, pairs, 4, seed=4)


def test_a_query_that_is_its_own_support_candidate_is_never_a_support():
    pairs = _pairs()
    # query a shows classes 1 and 2: class 2's supports must come from e and f
    first = [Episode("a", 1, ("b",))] * 20
    for episode in add_ways(first, pairs, 2, seed=0):
        if episode[1].class_id == 2:
            assert episode[1].supports[0] in ("e", "f")


def test_label_map_keeps_each_one_way_answer_unless_two_classes_claim_a_pixel():
    margins = [torch.tensor([[2.0, -1.0, 0.5, -3.0]]), torch.tensor([[1.0, 3.0, 0.7, -0.1]])]
    assert label_map(margins).tolist() == [[1, 2, 2, 0]]
    assert label_map(margins[:1]).tolist() == [[1, 0, 1, 0]]


@pytest.fixture(scope="module")
def toy_episodes():
    cfg = toy_config(64)
    cfg.data.synthetic.image_size, cfg.data.synthetic.images_per_class = 96, 6
    bench = build_benchmark(cfg.data)
    torch.manual_seed(0)
    model = FewShotSegmenter(cfg.model).eval()
    first = sample_test_episodes(bench.split.test_pairs, 8, 1, seed=0)
    return cfg, bench, model, first


def test_one_way_nway_scoring_is_the_one_way_evaluation(toy_episodes):
    cfg, bench, model, first = toy_episodes
    args = (model, bench.test_source, None, bench.split.novel, 64, torch.device("cpu"))
    single = evaluate_episodes(args[0], args[1], first, *args[3:], progress=False)
    nway, oneway, _ = evaluate_nway_episodes(
        args[0], args[1], add_ways(first, bench.split.test_pairs, 1, 0), *args[3:], progress=False
    )
    assert nway.compute() == single.compute() == oneway.compute()


def test_two_way_episodes_score_each_class_on_the_label_map(toy_episodes):
    cfg, bench, model, first = toy_episodes
    episodes = add_ways(first, bench.split.test_pairs, 2, 0)
    nway, oneway, seconds = evaluate_nway_episodes(
        model, bench.test_source, episodes, bench.split.novel, 64, torch.device("cpu"), progress=False
    )
    # both ways of every episode are scored: the episode counts hold 2 per episode
    assert sum(nway.compute()["class_episodes"].values()) == 2 * len(episodes)
    assert seconds["passes"] > 0 and seconds["merge"] >= 0
    # the label map gives each pixel to at most one class, so it never has more foreground than the
    # one-way masks together; a pixel the one-way masks did not claim stays background
    n, o = nway.state_dict(), oneway.state_dict()
    assert (n["class_union"] <= o["class_union"]).all()
    assert (n["class_intersection"] <= o["class_intersection"]).all()


def test_nway_evaluation_from_the_command_line(tmp_path):
    sets = [
        "model.backbone=toy", "model.weights=null", "model.channels=16", "data.image_size=64",
        "data.synthetic.image_size=96", "data.synthetic.images_per_class=6", "eval.episodes=6",
        "eval.seeds=[0]", "model.method=proto",
    ]  # fmt: skip
    args = [a for s in sets for a in ("--set", s)]
    for ways in (1, 2):
        out = tmp_path / f"w{ways}"
        assert main(["eval", "--quiet", "--output", str(out), *args, "--set", f"eval.ways={ways}"]) == 0
    one = json.loads((tmp_path / "w1" / "results.json").read_text())
    two = json.loads((tmp_path / "w2" / "results.json").read_text())
    assert two["settings"]["ways"] == 2 and one["settings"]["ways"] == 1
    assert "one-way runs" in two["experts"] and "2-way" in (tmp_path / "w2" / "results.md").read_text()
    files = sorted(p.name for p in (tmp_path / "w2" / "episodes").iterdir())
    assert files == ["synthetic-fold0-1shot-seed0-n6-2way.json", "synthetic-fold0-1shot-seed0-n6.json"]
    # the first ways are the one-way file's episodes
    flat = json.loads((tmp_path / "w2" / "episodes" / files[0]).read_text())["episodes"]
    ones = json.loads((tmp_path / "w1" / "episodes" / files[1]).read_text())["episodes"]
    assert flat[::2] == ones
    # the run is repeatable
    again = tmp_path / "again"
    assert main(["eval", "--quiet", "--output", str(again), *args, "--set", "eval.ways=2"]) == 0
    assert json.loads((again / "results.json").read_text())["summary"] == two["summary"]
    assert main(["eval", "--quiet", "--output", str(tmp_path / "bad"), *args, "--set", "eval.ways=0"]) == 2


# ------------------------------------------------------------------------------------------ user's hands
@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy.pt", balanced=True)
    return Predictor.from_checkpoint(path, device="cpu")


def test_predict_classes_merges_the_one_way_answers(predictor):
    query, _ = scene(seed=2)
    sa, ma = scene(seed=1)
    sb, mb = scene(48, 64, (5, 30, 20, 60), seed=3)
    sets = {"a": predictor.encode_supports(sa, ma), "b": predictor.encode_supports(sb, mb)}
    found = predictor.predict_classes(query, sets)
    alone = {name: predictor.predict(query, s) for name, s in sets.items()}
    assert found.labels.shape == query.shape[:2] and found.class_names == ["a", "b"]
    for k, name in enumerate(found.class_names):
        np.testing.assert_array_equal(found.probabilities[k], alone[name].probability)
    pa, pb = found.probabilities
    expected = np.where(np.maximum(pa, pb) > 0.5, np.where(pb > pa, 2, 1), 0)
    np.testing.assert_array_equal(found.labels, expected)
    assert set(np.unique(found.labels)) <= {0, 1, 2}
    np.testing.assert_array_equal(found.mask("b"), (found.labels == 2).astype(np.uint8))
    # one class: its label map is its one-way mask
    single = predictor.predict_classes(query, {"a": sets["a"]})
    np.testing.assert_array_equal(single.labels, alone["a"].mask)
    with pytest.raises(DataError, match="class 'c': its support masks mark no object pixel"):
        predictor.predict_classes(query, {"a": sets["a"], "c": predictor.encode_supports(sa, ma * 0)})
    with pytest.raises(DataError, match="no class given"):
        predictor.predict_classes(query, {})


def test_predict_command_with_several_classes(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "toy.pt", balanced=True)
    sa, ma = scene(seed=1)
    sb, mb = scene(48, 64, (5, 30, 20, 60), seed=3)
    query, _ = scene(seed=2)
    paths = {
        "sa": save_rgb(tmp_path / "sa.png", sa), "ma": save_rgb(tmp_path / "ma.png", ma * 255),
        "sb": save_rgb(tmp_path / "sb.png", sb), "mb": save_rgb(tmp_path / "mb.png", mb * 255),
        "q": save_rgb(tmp_path / "q.png", query),
    }  # fmt: skip
    base = ["predict", "--checkpoint", str(ckpt), "--query", str(paths["q"]), "--quiet"]
    two = ["--class", "cat", "--support", str(paths["sa"]), str(paths["ma"]),
           "--class", "dog", "--support", str(paths["sb"]), str(paths["mb"])]  # fmt: skip
    assert main([*base, *two, "--out", str(tmp_path / "o")]) == 0
    assert "label values: 0 background, 1 cat, 2 dog" in capsys.readouterr().err
    with Image.open(tmp_path / "o" / "q_labels.png") as im:
        assert im.mode == "P"
        labels = np.asarray(im)
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    sets = {
        "cat": predictor.encode_supports(paths["sa"], paths["ma"]),
        "dog": predictor.encode_supports(paths["sb"], paths["mb"]),
    }
    np.testing.assert_array_equal(labels, predictor.predict_classes(paths["q"], sets).labels)
    assert (tmp_path / "o" / "q_overlay.jpg").is_file() and not (tmp_path / "o" / "q_mask.png").exists()
    # one --class is the one-class output
    assert main([*base, *two[:5], "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "q_mask.png").is_file()
    # mistakes: named, exit 2, nothing written
    bad = [
        (["--support", str(paths["sa"]), str(paths["ma"]), *two], "give --class NAME before"),
        ([*two, "--class", "cat"], "--class cat is given twice"),
        (["--class", "cat", *two[5:]], "--class cat has no support after it"),
    ]
    for i, (extra, message) in enumerate(bad):
        assert main([*base, *extra, "--out", str(tmp_path / f"bad{i}")]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / f"bad{i}").exists()
