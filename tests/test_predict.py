"""Prediction on users' pictures: the Python API, the folder run and the ``dedn predict`` command."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dedn.cli import main
from dedn.data.transforms import TestTransform, restore_logits
from dedn.errors import CheckpointError, DataError
from dedn.predict import (
    Predictor,
    SupportSet,
    binarize_mask,
    find_images,
    load_image,
    load_mask,
    output_names,
    predict_files,
)
from usage_helpers import TOY_SIZE, make_checkpoint, save_rgb, scene, toy_config


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "toy.pt")


@pytest.fixture(scope="module")
def predictor(toy_ckpt):
    return Predictor.from_checkpoint(toy_ckpt, device="cpu")


@pytest.fixture(scope="module")
def episode():
    """Support (48x64) with its 0/1 mask and a query of another size (40x56)."""
    support, mask = scene(48, 64, (10, 12, 30, 40), seed=0)
    query, _ = scene(40, 56, (5, 20, 30, 50), seed=1)
    return support, mask, query


@pytest.fixture(scope="module")
def reference(predictor, episode):
    support, mask, query = episode
    return predictor.predict(query, support, mask, return_experts=True)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


# ------------------------------------------------------------------------------------------ checkpoints
def test_from_checkpoint_uses_the_saved_config(predictor):
    assert predictor.image_size == TOY_SIZE
    assert predictor.config.model.backbone == "toy"
    assert predictor.expert_names == ["object", "scenario"]


def test_from_checkpoint_rejects_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Predictor.from_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        Predictor.from_checkpoint(junk)
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="expected keys"):
        Predictor.from_checkpoint(tmp_path / "other.pt")


# ------------------------------------------------------------------------------------------- the result
def test_result_is_at_the_original_query_size(reference, episode):
    query = episode[2]
    assert reference.mask.shape == query.shape[:2] and reference.mask.dtype == np.uint8
    assert set(np.unique(reference.mask)) <= {0, 1}
    assert reference.probability.shape == query.shape[:2] and reference.probability.dtype == np.float32
    assert ((reference.probability >= 0) & (reference.probability <= 1)).all()
    np.testing.assert_array_equal(reference.mask, (reference.probability > 0.5).astype(np.uint8))
    assert set(reference.experts) == {"object", "scenario"}
    assert all(p.shape == query.shape[:2] for p in reference.experts.values())
    assert pytest.approx(sum(reference.fusion_weights.values()), abs=1e-5) == 1.0
    assert not reference.empty_support


def test_matches_the_model_run_on_the_evaluation_transform(predictor, episode, reference):
    """The predictor is the evaluation path: TestTransform, the model, restore_logits."""
    support, mask, query = episode
    t = TestTransform(TOY_SIZE)
    q, _, _ = t(query, None)
    s, m, _ = t(support, mask)
    with torch.no_grad():
        out = predictor.model(q[None], s[None, None], m[None, None])
    prob = restore_logits(out["logits"], t.scaled_hw(query.shape[:2]), query.shape[:2]).softmax(1)[0, 1]
    np.testing.assert_allclose(reference.probability, prob.numpy(), atol=1e-5)


def test_without_experts_by_default(predictor, episode):
    support, mask, query = episode
    result = predictor.predict(query, support, mask)
    assert result.experts is None and result.fusion_weights is None


# ------------------------------------------------------------------------------------------ input types
def _image_variants(tmp_path, image):
    """The same picture in every accepted form (all lossless, so the predictions must be identical)."""
    gray = image.mean(axis=2).astype(np.uint8)
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
    return {
        "png path": (save_rgb(tmp_path / "q.png", image), image),
        "str path": (str(save_rgb(tmp_path / "q2.png", image)), image),
        "PIL": (Image.fromarray(image), image),
        "uint8 HWC": (image, image),
        "uint16 HWC": (image.astype(np.uint16) * 257, image),
        "float HWC [0,1]": (image.astype(np.float32) / 255.0, image),
        "float HWC [0,255]": (image.astype(np.float64), image),
        "RGBA opaque": (rgba, image),
        "gray HW": (gray, np.repeat(gray[:, :, None], 3, axis=2)),
        "gray HW1": (gray[:, :, None], np.repeat(gray[:, :, None], 3, axis=2)),
        "tensor CHW float": (torch.from_numpy(image).permute(2, 0, 1).float() / 255.0, image),
        "tensor HWC uint8": (torch.from_numpy(image), image),
        "tensor 1CHW": (torch.from_numpy(image).permute(2, 0, 1)[None], image),
    }


def test_every_image_input_type_gives_the_same_prediction(predictor, episode, tmp_path):
    support, mask, query = episode
    support_set = predictor.encode_supports(support, mask)
    for name, (given, equivalent) in _image_variants(tmp_path, query).items():
        loaded = load_image(given)
        np.testing.assert_array_equal(loaded.pixels, equivalent, err_msg=name)
        result = predictor.predict(given, support_set)
        expected = predictor.predict(equivalent, support_set)
        assert result.mask.shape == query.shape[:2], name
        np.testing.assert_allclose(result.probability, expected.probability, atol=1e-6, err_msg=name)


def test_supports_as_tensors_pil_and_paths(predictor, episode, tmp_path, reference):
    support, mask, query = episode
    variants = [
        (save_rgb(tmp_path / "s.png", support), save_rgb(tmp_path / "m.png", mask * 255)),
        (Image.fromarray(support), Image.fromarray(mask)),
        (torch.from_numpy(support).permute(2, 0, 1), torch.from_numpy(mask)),
        ([support], [mask.astype(bool)]),
    ]
    for image, m in variants:
        result = predictor.predict(query, image, m)
        np.testing.assert_allclose(result.probability, reference.probability, atol=1e-6)


def test_transparent_pixels_become_the_padding_colour():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    pixels = load_image(rgba).pixels
    assert (pixels[:2] == 200).all()
    np.testing.assert_array_equal(pixels[3, 0], [124, 116, 104])  # PAD_RGB * 255, rounded


def test_16bit_png_file(predictor, tmp_path):
    ramp = (np.arange(32 * 40).reshape(32, 40) * 50).astype(np.uint16)  # values up to 63,950
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = load_image(tmp_path / "deep.png").pixels
    assert pixels.shape == (32, 40, 3)
    np.testing.assert_array_equal(pixels[..., 0], np.round(ramp / 257.0).astype(np.uint8))
    assert pixels.max() > 240  # not clipped to white, not left dark


def test_bad_images_are_named(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match="broken.jpg"):
        load_image(broken)
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(DataError, match="shape"):
        load_image(np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(DataError, match="NaN"):
        load_image(np.full((4, 4), np.nan, np.float32))
    with pytest.raises(DataError, match="unsupported image type"):
        load_image(12)


# ---------------------------------------------------------------------------------------------- masks
def test_mask_encodings_all_mean_the_same_object(predictor, episode, reference, tmp_path):
    support, mask, query = episode
    palette = Image.fromarray(mask * 15, mode="P")  # class 15 ("person" in VOC) as a palette index
    palette.putpalette([0, 0, 0, 192, 128, 128] * 128)
    palette.save(tmp_path / "palette.png")
    border = mask * 7
    border[9, 10:40] = 255  # a VOC-style "ignore" border above the object
    Image.fromarray(mask.astype(np.uint16) * 65535).save(tmp_path / "deep.png")
    soft = np.where(mask == 1, 240, 10).astype(np.uint8)  # JPEG-like: near-black and near-white
    soft[0, 0], soft[1, 1], soft[15, 20] = 120, 100, 140  # edge values on both sides of the threshold
    colour = np.zeros(mask.shape + (3,), np.uint8)
    colour[mask == 1] = (255, 0, 0)
    drawn = np.zeros(mask.shape + (4,), np.uint8)
    drawn[mask == 1] = (255, 40, 40, 255)
    variants = {
        "0/255": mask * 255,
        "0/1": mask,
        "bool": mask.astype(bool),
        "float": mask.astype(np.float32),
        "palette file": tmp_path / "palette.png",
        "16-bit file": tmp_path / "deep.png",
        "soft gray": soft,
        "red on black": colour,
        "RGBA stroke": drawn,
    }
    for name, m in variants.items():
        binary = binarize_mask(load_mask(m).pixels, palette=load_mask(m).palette)
        np.testing.assert_array_equal(binary == 1, mask == 1, err_msg=name)
        result = predictor.predict(query, support, m)
        np.testing.assert_allclose(result.probability, reference.probability, atol=1e-6, err_msg=name)
    # a single class with an ignore border: 255 stays "ignore"
    assert set(np.unique(binarize_mask(border))) == {0, 1, 255}


def test_mask_value_picks_one_class(predictor, episode, reference, tmp_path):
    support, mask, query = episode
    two = mask * 3
    two[40:, :10] = 8  # a second class
    image = Image.fromarray(two, mode="P")
    image.putpalette(list(range(256)) * 3)
    image.save(tmp_path / "two.png")
    with pytest.raises(DataError, match="mask_value"):
        predictor.predict(query, support, tmp_path / "two.png")
    result = predictor.predict(query, support, tmp_path / "two.png", mask_value=3)
    np.testing.assert_allclose(result.probability, reference.probability, atol=1e-6)
    with pytest.raises(DataError, match="no pixel of value 5"):
        predictor.predict(query, support, tmp_path / "two.png", mask_value=5)


def test_several_colours_need_a_label_map():
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[:4] = (255, 0, 0)
    colour[4:6] = (0, 255, 0)
    with pytest.raises(DataError, match="colours"):
        load_mask(colour)


def test_mask_size_must_match_its_image(predictor, episode, tmp_path):
    support, mask, query = episode
    save_rgb(tmp_path / "support.png", support)
    save_rgb(tmp_path / "small_mask.png", mask[:30] * 255)
    with pytest.raises(DataError, match=r"small_mask.png is 64x30.*support.png is 64x48"):
        predictor.predict(query, tmp_path / "support.png", tmp_path / "small_mask.png")


def test_exif_orientation_is_applied_to_images_and_masks(predictor, episode, tmp_path):
    support, mask, query = episode
    # Stored sideways with orientation 6 ("rotate 90 degrees clockwise to display"), as phones do.
    stored = np.ascontiguousarray(np.rot90(query, k=1))
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=_exif(6))
    loaded = load_image(tmp_path / "phone.png")
    assert loaded.orientation == 6 and loaded.stored_hw == (56, 40)
    np.testing.assert_array_equal(loaded.pixels, query)
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=_exif(6), quality=95)
    loaded = load_image(tmp_path / "phone.jpg")
    assert loaded.pixels.shape[:2] == query.shape[:2]
    error = np.abs(loaded.pixels.astype(int) - query.astype(int)).mean()
    assert error < np.abs(loaded.pixels.astype(int) - np.rot90(query, 2).astype(int)).mean() / 2
    result = predictor.predict(tmp_path / "phone.jpg", support, mask)
    assert result.mask.shape == query.shape[:2]
    # a support and its mask, both stored sideways with the tag: aligned after the turn
    Image.fromarray(np.ascontiguousarray(np.rot90(support, k=1))).save(tmp_path / "s.png", exif=_exif(6))
    Image.fromarray(np.ascontiguousarray(np.rot90(mask * 255, k=1))).save(tmp_path / "m.png", exif=_exif(6))
    turned = predictor.predict(query, tmp_path / "s.png", tmp_path / "m.png")
    direct = predictor.predict(query, support, mask)
    np.testing.assert_allclose(turned.probability, direct.probability, atol=1e-6)
    # a mask drawn on the stored (sideways) pixels does not fit the displayed photo: say so
    Image.fromarray(np.ascontiguousarray(np.rot90(mask * 255, k=1))).save(tmp_path / "raw_mask.png")
    with pytest.raises(DataError, match="EXIF orientation"):
        predictor.predict(query, tmp_path / "s.png", tmp_path / "raw_mask.png")


# ------------------------------------------------------------------------------------------- K shots
def test_k_shots_of_different_sizes(predictor, episode):
    support, mask, query = episode
    other, other_mask = scene(70, 50, (20, 5, 50, 40), seed=3)
    result = predictor.predict(query, [support, other], [mask, other_mask], return_experts=True)
    assert result.mask.shape == query.shape[:2]
    support_set = predictor.encode_supports([support, other], [mask, other_mask])
    assert support_set.shots == 2
    assert support_set.foreground_pixels == [int(mask.sum()), int(other_mask.sum())]
    again = predictor.predict(query, support_set)
    np.testing.assert_allclose(again.probability, result.probability, atol=1e-6)
    with pytest.raises(DataError, match="2 support images but 1 support masks"):
        predictor.encode_supports([support, other], [mask])


def test_stacks_of_k_supports(predictor):
    supports = np.stack([scene(40, 40, seed=i)[0] for i in range(2)])
    masks = np.stack([scene(40, 40, seed=i)[1] for i in range(2)])
    support_set = predictor.encode_supports(supports, masks)
    assert isinstance(support_set, SupportSet) and support_set.shots == 2


def test_empty_support_predicts_background(predictor, episode):
    support, mask, query = episode
    result = predictor.predict(query, support, np.zeros_like(mask))
    assert result.empty_support and not result.mask.any()


def test_support_set_excludes_masks(predictor, episode):
    support, mask, query = episode
    support_set = predictor.encode_supports(support, mask)
    with pytest.raises(DataError, match="must be None"):
        predictor.predict(query, support_set, mask)


# ------------------------------------------------------------------------------------------- folders
@pytest.fixture
def query_folder(tmp_path, episode):
    folder = tmp_path / "queries"
    folder.mkdir()
    query = episode[2]
    save_rgb(folder / "a.jpg", query)
    save_rgb(folder / "b.png", query[:30])
    save_rgb(folder / "a.png", query)  # same stem as a.jpg
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    return folder


def test_find_images_and_output_names(query_folder):
    images, others = find_images([query_folder])
    assert [p.name for p in images] == ["a.jpg", "a.png", "b.png", "corrupt.jpg"]
    assert [p.name for p in others] == ["notes.txt"]
    assert output_names(images) == ["a_jpg", "a_png", "b", "corrupt"]
    with pytest.raises(DataError, match="does not exist"):
        find_images([query_folder / "nope"])


def test_folder_run_skips_a_corrupt_file(predictor, episode, query_folder, tmp_path):
    support, mask, _ = episode
    support_set = predictor.encode_supports(support, mask)
    images, others = find_images([query_folder])
    messages: list[str] = []
    out = tmp_path / "out"
    summary = predict_files(
        predictor, support_set, images, out, progress=False, ignored=others, report=messages.append
    )
    assert [p.name for p in summary.done] == ["a.jpg", "a.png", "b.png"]
    assert [p.name for p, _ in summary.skipped] == ["corrupt.jpg"]
    assert len(messages) == 1 and "corrupt.jpg" in messages[0]
    text = summary.format()
    assert "3 image(s) segmented, 1 skipped" in text and "corrupt.jpg" in text and "notes.txt" in text
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        f"{n}_{kind}" for n in ("a_jpg", "a_png", "b") for kind in ("mask.png", "overlay.jpg")
    )
    mask_b = np.asarray(Image.open(out / "b_mask.png"))
    assert mask_b.shape == (30, 56) and set(np.unique(mask_b)) <= {0, 255}
    assert Image.open(out / "b_overlay.jpg").size == (56, 30)


def test_cli_predict(toy_ckpt, episode, query_folder, tmp_path, capsys):
    support, mask, _ = episode
    save_rgb(tmp_path / "support.jpg", support, quality=95)
    save_rgb(tmp_path / "support_mask.png", mask * 255)
    out = tmp_path / "out"
    args = [
        "predict",
        "--checkpoint",
        str(toy_ckpt),
        "--support",
        str(tmp_path / "support.jpg"),
        str(tmp_path / "support_mask.png"),
        "--query",
        str(query_folder),
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 1  # one file skipped
    captured = capsys.readouterr()
    assert "3 image(s) segmented, 1 skipped" in captured.out and "corrupt.jpg" in captured.out
    assert "corrupt.jpg" in captured.err
    assert (out / "b_mask.png").is_file() and (out / "a_jpg_overlay.jpg").is_file()
    # a single good query: exit 0; two supports (K = 2)
    args2 = args[:6] + [
        "--support",
        str(tmp_path / "support.jpg"),
        str(tmp_path / "support_mask.png"),
        "--query",
        str(query_folder / "b.png"),
        "--out",
        str(tmp_path / "one"),
        "--quiet",
    ]
    assert main(args2) == 0
    assert (tmp_path / "one" / "b_mask.png").is_file()


def test_cli_predict_bad_support_is_an_error(toy_ckpt, query_folder, tmp_path, capsys):
    args = [
        "predict",
        "--checkpoint",
        str(toy_ckpt),
        "--support",
        str(query_folder / "corrupt.jpg"),
        str(query_folder / "a.png"),
        "--query",
        str(query_folder),
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    ]
    assert main(args) == 2
    assert "corrupt.jpg" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    black = save_rgb(tmp_path / "black.png", np.zeros((40, 56), np.uint8))
    args[4:6] = [str(query_folder / "a.png"), str(black)]
    assert main(args) == 2
    assert "no object pixel" in capsys.readouterr().err


def test_cli_predict_into_the_query_folder_twice(toy_ckpt, episode, tmp_path, capsys):
    support, mask, query = episode
    folder = tmp_path / "photos"
    folder.mkdir()
    save_rgb(folder / "one.png", query)
    save_rgb(tmp_path / "s.png", support)
    save_rgb(tmp_path / "m.png", mask * 255)
    args = [
        "predict",
        "--checkpoint",
        str(toy_ckpt),
        "--support",
        str(tmp_path / "s.png"),
        str(tmp_path / "m.png"),
        "--query",
        str(folder),
        "--out",
        str(folder),
        "--quiet",
    ]
    assert main(args) == 0 and main(args) == 0  # the second run does not segment the first run's outputs
    assert capsys.readouterr().out.count("1 image(s) segmented, 0 skipped") == 2
    assert sorted(p.name for p in folder.iterdir()) == ["one.png", "one_mask.png", "one_overlay.jpg"]


def test_a_checkpoint_with_the_matcher_reports_three_fusion_weights(tmp_path, episode):
    """model.fusion.matcher=proto in a checkpoint's config: the Predictor reports the weight of each of
    the three AWF members, and the mask is the fused one that `dedn eval` scores."""
    cfg = toy_config()
    cfg.model.fusion.matcher = "proto"
    predictor = Predictor.from_checkpoint(make_checkpoint(tmp_path / "m.pt", cfg), device="cpu")
    support, mask, query = episode
    result = predictor.predict(query, support, mask, return_experts=True)
    assert list(result.fusion_weights) == ["object", "scenario", "proto"]
    assert sum(result.fusion_weights.values()) == pytest.approx(1.0)
    assert set(result.experts) == {"object", "scenario"}
    assert result.mask.shape == query.shape[:2]


def test_the_probe_matcher_is_fitted_once_per_support_set(tmp_path, episode, monkeypatch):
    """model.fusion.matcher=probe: with an encoded SupportSet, the support-side work (the probe's fit and
    AWF's support scores) is done for the first query only; every query gets the mask it gets alone."""
    cfg = toy_config()
    cfg.model.fusion.matcher, cfg.model.fusion.confidence = "probe", False
    predictor = Predictor.from_checkpoint(make_checkpoint(tmp_path / "m.pt", cfg), device="cpu")
    support, mask, query = episode
    other, _ = scene(40, 56, (2, 2, 20, 30), seed=5)
    alone = [predictor.predict(q, support, mask) for q in (query, other)]
    calls = []
    for name in ("fit_probe", "support_scores"):
        original = getattr(predictor.model, name)
        monkeypatch.setattr(
            predictor.model, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    encoded = predictor.encode_supports(support, mask)
    shared = [predictor.predict(query, encoded)]
    # the first query: one fit for its pass, one inside the support-score pass
    assert sorted(calls) == ["fit_probe", "fit_probe", "support_scores"]
    shared += [predictor.predict(q, encoded) for q in (other, query)]
    assert len(calls) == 3  # nothing more for the next queries
    for got, want in zip(shared, alone + alone[:1], strict=True):
        assert np.array_equal(got.mask, want.mask)
        assert np.allclose(got.probability, want.probability, atol=1e-6)


def test_test_time_settings_replace_the_checkpoints_and_nothing_else(tmp_path):
    ckpt = make_checkpoint(tmp_path / "m.pt")
    predictor = Predictor.from_checkpoint(
        ckpt, test_time={"model.fusion.matcher": "probe", "model.fusion.score": "hard"}
    )
    assert predictor.fusion_members == ["object", "scenario", "probe"]
    assert predictor.config.model.fusion.matcher == "probe" and predictor.config.model.fusion.score == "hard"
    with pytest.raises(CheckpointError, match="model.channels is not a test-time setting"):
        Predictor.from_checkpoint(ckpt, test_time={"model.channels": 8})


# ------------------------------------------------------------------------------ silent wrong answers (41)
def _predict_args(ckpt, support, mask, query, out, *extra):
    return ["predict", "--checkpoint", str(ckpt), "--support", str(support), str(mask), "--query",
            str(query), "--out", str(out), "--quiet", *extra]  # fmt: skip


def test_a_support_given_as_mask_then_image_is_refused(toy_ckpt, episode, tmp_path, capsys):
    """--support MASK IMAGE (swapped): a clear message naming both files, exit 2, nothing written; the
    Python API says the same."""
    support, mask, query = episode
    image_path = save_rgb(tmp_path / "s.jpg", support, quality=95)
    mask_path = save_rgb(tmp_path / "m.png", mask * 255)
    query_path = save_rgb(tmp_path / "q.jpg", query)
    out = tmp_path / "out"
    assert main(_predict_args(toy_ckpt, mask_path, image_path, query_path, out)) == 2
    err = capsys.readouterr().err
    assert "m.png looks like a mask" in err and "s.jpg like a photo" in err and "IMAGE then MASK" in err
    assert not out.exists()
    with pytest.raises(DataError, match="looks like a mask"):
        Predictor.from_checkpoint(toy_ckpt).encode_supports(mask_path, image_path)
    assert main(_predict_args(toy_ckpt, image_path, mask_path, query_path, out)) == 0  # the right order


def test_a_folder_in_the_readme_layout_segments_photos_not_their_masks(toy_ckpt, episode, tmp_path, capsys):
    """x.jpg + x.png (its mask) in a query folder: only the photo is segmented; the mask and a subfolder
    are named as passed over. A photo saved as PNG next to a JPEG of the same name is still a query."""
    support, mask, query = episode
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    save_rgb(folder / "cat.jpg", query)
    save_rgb(
        folder / "cat.png",
        ((np.arange(query.shape[1]) > 20)[None].repeat(query.shape[0], 0) * 255).astype(np.uint8),
    )
    save_rgb(folder / "dog.jpg", query)
    save_rgb(folder / "dog.png", query)  # a photo, not a mask
    s = save_rgb(tmp_path / "s.jpg", support, quality=95)
    m = save_rgb(tmp_path / "m.png", mask * 255)
    assert main(_predict_args(toy_ckpt, s, m, folder, tmp_path / "out")) == 0
    text = capsys.readouterr().out
    assert "3 image(s) segmented" in text
    assert "1 mask(s) next to their photos passed over: cat.png" in text
    assert "1 subfolder(s) not searched: more" in text
    assert sorted(p.name for p in (tmp_path / "out").glob("*_mask.png")) == [
        "cat_mask.png", "dog_jpg_mask.png", "dog_png_mask.png"
    ]  # fmt: skip


def test_an_empty_prediction_is_reported_with_its_highest_probability(toy_ckpt, episode, tmp_path, capsys):
    """A query whose mask comes back empty is named with its highest foreground probability (not only
    counted as segmented); --threshold moves the decision and is checked."""
    support, mask, query = episode
    s = save_rgb(tmp_path / "s.jpg", support, quality=95)
    m = save_rgb(tmp_path / "m.png", mask * 255)
    q = save_rgb(tmp_path / "q.jpg", query)
    top = float(Predictor.from_checkpoint(toy_ckpt).predict(q, s, m).probability.max())
    assert (
        main(_predict_args(toy_ckpt, s, m, q, tmp_path / "out", "--threshold", str(min(0.99, top + 0.005))))
        == 0
    )
    captured = capsys.readouterr()
    assert (
        "no object found in" in captured.err and f"highest foreground probability {top:.2f}" in captured.err
    )
    assert "1 of them with no object found" in captured.out
    assert not np.asarray(Image.open(tmp_path / "out" / "q_mask.png")).any()
    assert (
        main(_predict_args(toy_ckpt, s, m, q, tmp_path / "low", "--threshold", str(max(0.01, top - 0.01))))
        == 0
    )
    assert np.asarray(Image.open(tmp_path / "low" / "q_mask.png")).any()
    assert "no object found" not in capsys.readouterr().err
    assert main(_predict_args(toy_ckpt, s, m, q, tmp_path / "bad", "--threshold", "1.5")) == 2
    assert "--threshold 1.5" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_predict_runs_the_training_free_methods_and_takes_threads(toy_ckpt, episode, tmp_path, capsys):
    """--method proto | prior: the training-free matchers on the checkpoint's backbone, the same masks as
    Predictor.training_free; --threads sets torch's thread count, and 0 is refused."""
    support, mask, query = episode
    s = save_rgb(tmp_path / "s.jpg", support, quality=95)
    m = save_rgb(tmp_path / "m.png", mask * 255)
    q = save_rgb(tmp_path / "q.jpg", query)
    before = torch.get_num_threads()
    try:
        for method in ("proto", "prior"):
            out = tmp_path / method
            assert main(_predict_args(toy_ckpt, s, m, q, out, "--method", method, "--threads", "1")) == 0
            assert torch.get_num_threads() == 1
            want = Predictor.training_free(method, Predictor.from_checkpoint(toy_ckpt)).predict(q, s, m).mask
            assert np.array_equal(np.asarray(Image.open(out / "q_mask.png")) > 0, want > 0)
            assert f"method {method}" in capsys.readouterr().err
        assert main(_predict_args(toy_ckpt, s, m, q, tmp_path / "t0", "--threads", "0")) == 2
        assert "--threads 0" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)
