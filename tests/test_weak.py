"""Weak supports (dedn.weak): boxes and scribbles made from masks, a user's box, and their scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dedn.cli import main
from dedn.engine.evaluate import EpisodeRunner
from dedn.errors import DataError
from dedn.predict import Predictor
from dedn.weak import (
    Box,
    box_from_mask,
    box_mask,
    box_support,
    check_box,
    equal_scores,
    scribble_seed,
    scribbles_from_mask,
)
from usage_helpers import make_checkpoint, save_rgb, scene, toy_config


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return Predictor.from_checkpoint(
        make_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy.pt"), device="cpu"
    )


def _two_objects() -> np.ndarray:
    mask = np.zeros((60, 80), np.uint8)
    mask[10:20, 5:15] = 1
    mask[30:50, 40:70] = 1
    mask[9, :] = 255  # an ignore border is not object
    return mask


def test_box_from_mask_is_the_tight_box_around_every_object_pixel():
    assert box_from_mask(_two_objects()) == (5, 10, 70, 50)
    assert box_from_mask(np.zeros((4, 4), np.uint8)) is None
    filled = box_mask((60, 80), (5, 10, 70, 50))
    assert filled.sum() == 65 * 40 and filled[10, 5] == 1 and filled[50, 70] == 0


def test_a_users_box_is_checked_against_its_image():
    assert check_box(Box(0, 0, 80, 60), (60, 80), "s") == (0, 0, 80, 60)
    assert check_box((-0.5, 1.2, 80.4, 59.9), (60, 80), "s") == (0, 1, 80, 60)  # clipped to the picture
    for box, message in [
        ((10, 10, 5, 20), "is empty"),
        ((0, 0, 90, 20), "runs outside the 80x60 image"),
        ((0, 0, 1, 20), "under 2 pixels"),
        ((0, 0, 10), "4 numbers"),
        ((0, float("nan"), 10, 10), "not a number"),
    ]:
        with pytest.raises(DataError, match=message) as e:
            check_box(box, (60, 80), "support 1 box (dog.jpg)")
        assert str(e.value).startswith("support 1 box (dog.jpg)")


def test_scribbles_lie_on_their_region_and_are_the_same_for_a_seed():
    mask = _two_objects()
    one = scribbles_from_mask(mask, scribble_seed("2007_000033", 3, 0))
    assert set(np.unique(one)) == {0, 1, 255}
    assert (mask[one == 1] == 1).all() and (mask[one == 0] == 0).all()  # never on the other region
    assert (one == 255).mean() > 0.8  # sparse: most pixels are unlabelled
    np.testing.assert_array_equal(one, scribbles_from_mask(mask, scribble_seed("2007_000033", 3, 0)))
    assert (one != scribbles_from_mask(mask, scribble_seed("2007_000033", 3, 1))).any()
    assert scribble_seed("a", 1, 0) != scribble_seed("a", 2, 0)
    # a mask without object gives only background strokes
    empty = scribbles_from_mask(np.zeros((30, 30), np.uint8), 1)
    assert (empty != 1).all() and (empty == 0).any()


def test_box_refinement_keeps_the_object_part_of_the_box_and_ignores_the_rest():
    """Features that tell object from background: the refined box keeps the object's cells, marks the
    rest of the box 'ignore', and leaves the outside background; 'none' keeps the whole box."""
    torch.manual_seed(0)
    grid, size = 8, 64
    obj = torch.zeros(grid, grid, dtype=torch.bool)
    obj[2:5, 2:5] = True
    high = torch.randn(16, grid, grid) * 0.1
    high[0] += obj.float() * 3  # channel 0 marks the object
    high[1] += 1.0
    box = torch.zeros(size, size, dtype=torch.long)
    box[16:48, 16:48] = 1  # cells 2..5: the object (2..4) and one row and column of background
    box[:, 60:] = 255  # padding

    from dedn.models.ops import fit_support_probe, mask_fractions

    def fit(h, fg, bg):
        return fit_support_probe(h, fg, bg, torch.zeros(1, 16), 20, 0.01)

    def fractions(masks, hw):
        b, k = masks.shape[:2]
        fg, bg = mask_fractions(masks.flatten(0, 1), hw)
        return fg.view(b, k, 1, *hw), bg.view(b, k, 1, *hw)

    refined = box_support(high, box, "probe", fit, fractions)
    assert refined[20, 20] == 1 and refined[44, 44] == 255  # object kept, the box's background ignored
    assert refined[5, 5] == 0 and refined[5, 62] == 255  # outside and padding unchanged
    assert (refined == 1).sum() < (box == 1).sum()
    assert torch.equal(box_support(high, box, "none", fit, fractions), box)


def test_predictor_takes_a_box_where_a_mask_goes(predictor, tmp_path):
    support, mask = scene(48, 64, (10, 12, 30, 40), seed=0)
    query, _ = scene(40, 56, (5, 20, 30, 50), seed=1)
    box = Box(*box_from_mask(mask))
    predictor.box_refinement = "none"
    try:
        as_box = predictor.predict(query, support, box).mask
    finally:
        predictor.box_refinement = "probe"
    # an unrefined box around a rectangle is that rectangle's mask
    np.testing.assert_array_equal(as_box, predictor.predict(query, support, mask).mask)
    refined = predictor.encode_supports([support], [box])
    assert refined.masks.shape == (1, 1, predictor.image_size, predictor.image_size)
    with pytest.raises(DataError, match="support 1 box .* runs outside"):
        predictor.predict(query, support, Box(0, 0, 70, 10))


def test_cli_support_box(predictor, tmp_path, capsys):
    support, mask = scene(48, 64, (10, 12, 30, 40), seed=0)
    query, _ = scene(40, 56, (5, 20, 30, 50), seed=1)
    s = save_rgb(tmp_path / "s.png", support)
    q = save_rgb(tmp_path / "q.png", query)
    ckpt = make_checkpoint(tmp_path / "toy.pt")
    base = ["predict", "--checkpoint", str(ckpt), "--query", str(q), "--quiet"]
    x0, y0, x1, y1 = map(str, box_from_mask(mask))
    assert main([*base, "--support-box", str(s), x0, y0, x1, y1, "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "q_mask.png").is_file()
    assert main([*base, "--support-box", str(s), x0, y0, "x", y1, "--out", str(tmp_path / "p")]) == 2
    assert "'x' is not a number" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert main([*base, "--support-box", str(s), "0", "0", "99", "10", "--out", str(tmp_path / "p")]) == 2
    assert "runs outside the 64x48 image" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert main([*base, "--out", str(tmp_path / "p")]) == 2
    assert "no support" in capsys.readouterr().err


def test_evaluation_gives_each_support_as_a_box_or_scribbles(tmp_path):
    """eval.support_annotation: the episode runner hands the model the box's mask (refined or not) or
    the scribbles, made from each support's mask once per (image, class); the same every run."""
    from dedn.data.episodes import binarize, sample_test_episodes
    from dedn.engine.benchmark import build_benchmark
    from dedn.models.network import FewShotSegmenter

    cfg = toy_config(64)
    cfg.data.synthetic.image_size, cfg.data.synthetic.images_per_class = 96, 6
    bench = build_benchmark(cfg.data)
    torch.manual_seed(0)
    model = FewShotSegmenter(cfg.model).eval()
    episodes = sample_test_episodes(bench.split.test_pairs, 6, 1, seed=0)
    cpu = torch.device("cpu")

    def masks(annotation, refinement="probe"):
        runner = EpisodeRunner(model, bench.test_source, 64, cpu, None, None, annotation, refinement, 0)
        out = []
        for ep in episodes:
            feats = {k: v.unsqueeze(0).unsqueeze(0) for k, v in runner._features(ep.supports[0]).items()}
            out.append(runner.support_masks(ep, feats)[0, 0])
        return out, runner

    full, runner = masks("mask")
    boxes, box_runner = masks("box", "none")
    refined, _ = masks("box")
    scribbles, _ = masks("scribble")
    for ep, m, b, r, s in zip(episodes, full, boxes, refined, scribbles, strict=True):
        label = binarize(runner.label(ep.supports[0]), ep.class_id, runner.ignore)
        x0, y0, x1, y1 = box_from_mask(label)
        _, expected, _ = runner.transform(None, box_mask(label.shape, (x0, y0, x1, y1)))
        assert torch.equal(b, expected)
        assert ((m == 1) <= (b == 1) | (m == 255)).all()  # the box holds the object
        assert ((r == 1) <= (b == 1)).all() and torch.equal(r == 0, b == 0)  # refined inside the box
        assert ((s != 255) <= (m == s) | (m == 255)).all()  # scribbles agree with the mask
        assert (s == 255).float().mean() > 0.5
    # with boxes the experts are averaged (no mask to score them against); with masks AWF weighs them
    assert torch.equal(box_runner.run(episodes[0])[2]["fusion_weights"], torch.tensor([[0.5, 0.5]]))
    assert not torch.equal(runner.run(episodes[0])[2]["fusion_weights"], torch.tensor([[0.5, 0.5]]))
    again, _ = masks("scribble")
    assert all(torch.equal(a, b) for a, b in zip(scribbles, again, strict=True))


def test_with_a_box_dedn_averages_its_experts(tmp_path):
    """A box is not the object's mask, so AWF has nothing to score its members against: with a box
    support the two experts are averaged and the probe (fitted to the box) is left out; with masks only,
    AWF weighs the three members as before."""
    cfg = toy_config()
    cfg.model.fusion.matcher, cfg.model.fusion.confidence = "probe", False
    predictor = Predictor.from_checkpoint(make_checkpoint(tmp_path / "m.pt", cfg), device="cpu")
    support, mask = scene(48, 64, (10, 12, 30, 40), seed=0)
    query, _ = scene(40, 56, (5, 20, 30, 50), seed=1)
    boxed = predictor.predict(query, support, Box(*box_from_mask(mask)), return_experts=True)
    assert boxed.fusion_weights == {"object": 0.5, "scenario": 0.5, "probe": 0.0}
    expected = (boxed.experts["object"] + boxed.experts["scenario"]) / 2
    np.testing.assert_allclose(boxed.probability, expected, atol=1e-5)
    masked = predictor.predict(query, support, mask, return_experts=True)
    assert masked.fusion_weights["probe"] > 0 and masked.fusion_weights["object"] != 0.5
    # a box among masks: the set has a box, so the same rule
    two = predictor.predict(query, [support, support], [mask, Box(*box_from_mask(mask))], return_experts=True)
    assert two.fusion_weights["probe"] == 0.0
    assert equal_scores(Predictor.training_free("proto", predictor).model) is None
