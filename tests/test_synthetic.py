"""The embedded synthetic benchmark: determinism, label values, eligibility, speed, offline photos."""

import pickle
import socket
import time

import numpy as np
import pytest

from dedn.data import synthetic
from dedn.data.base import SegmentationSource
from dedn.data.synthetic import SHAPE_NAMES, SyntheticSource
from dedn.errors import ConfigError, DataError

PROTOCOL_MIN_PIXELS = 2048  # PROTOCOL.md: a pair counts where the class covers >= 2 * 32 * 32 pixels


def test_interface_ids_and_classes():
    src = SyntheticSource(num_classes=20, images_per_class=2)
    assert isinstance(src, SegmentationSource)
    assert src.name == "synthetic" and src.num_classes == 20 and len(src) == 40
    assert src.class_names == list(SHAPE_NAMES) and src.class_names[:3] == ["disc", "ring", "square"]
    assert src.ids[0] == "syn_00000" and src.ids[-1] == "syn_00039"
    assert [src.main_class(i) for i in src.ids[:3]] == [1, 2, 3] and src.main_class("syn_00020") == 1
    assert "seed=0" in src.describe("syn_00005")
    names = SyntheticSource(num_classes=25, images_per_class=1).class_names
    assert len(set(names)) == 25 and names[20] == "disc2"


def test_unknown_ids_and_bad_settings():
    src = SyntheticSource(num_classes=3, images_per_class=2)
    for bad in ("syn_00006", "syn_x", "img_00001", "syn_-0001"):
        with pytest.raises(DataError, match="unknown synthetic image id"):
            src.load_image(bad)
    for kwargs in ({"num_classes": 0}, {"image_size": 8}, {"seed": -1}, {"second_object": 1.5}):
        with pytest.raises(ConfigError):
            SyntheticSource(**kwargs)


def test_same_seed_same_data_other_seed_different():
    ids = ["syn_00000", "syn_00007", "syn_00033"]
    a = SyntheticSource(seed=0, images_per_class=2)
    b = SyntheticSource(seed=0, images_per_class=2)
    # generate b's images in another order: image i depends on (seed, i) only
    for image_id in reversed(ids):
        b.load_pair(image_id)
    c = SyntheticSource(seed=1, images_per_class=2)
    for image_id in ids:
        image_a, label_a = a.load_pair(image_id)
        image_b, label_b = b.load_pair(image_id)
        assert np.array_equal(image_a, image_b) and np.array_equal(label_a, label_b)
        image_c, _ = c.load_pair(image_id)
        assert image_a.shape != image_c.shape or not np.array_equal(image_a, image_c)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.fingerprint() != SyntheticSource(seed=0, images_per_class=2, ignore_border=0).fingerprint()


def test_images_and_labels_are_well_formed():
    src = SyntheticSource(images_per_class=2)
    shapes = set()
    for image_id in src.ids:
        image, label = src.load_pair(image_id)  # load_label checks the value range
        assert image.dtype == np.uint8 and label.dtype == np.uint8 and image.ndim == 3
        shapes.add(image.shape[:2])
        values = set(np.unique(label).tolist())
        assert values <= set(range(21)) | {255}
        assert 0 in values and 255 in values and src.main_class(image_id) in values
        assert image.std() > 10  # not a flat picture
    assert shapes == {(160, 160), (160, 120), (120, 160)}


def test_every_main_object_is_eligible_at_the_default_size():
    src = SyntheticSource(images_per_class=3)
    assert src.min_pixels == PROTOCOL_MIN_PIXELS
    eligible = dict.fromkeys(range(1, 21), 0)
    for image_id in src.ids:
        label = src.load_label(image_id)
        main = src.main_class(image_id)
        covered = int((label == main).sum())
        assert covered >= PROTOCOL_MIN_PIXELS, (image_id, covered)
        assert covered <= 0.45 * label.size  # the main object never fills the picture
        for value, count in zip(*np.unique(label, return_counts=True), strict=True):
            if 0 < value < 255 and count >= PROTOCOL_MIN_PIXELS:
                eligible[int(value)] += 1
    assert min(eligible.values()) >= src.images_per_class


def test_small_images_scale_the_threshold():
    src = SyntheticSource(images_per_class=1, image_size=64)
    assert src.min_pixels == int(0.09 * 64 * 64)
    for image_id in src.ids:
        image, label = src.load_pair(image_id)
        assert max(image.shape[:2]) == 64
        assert (label == src.main_class(image_id)).sum() >= src.min_pixels


def test_second_objects_and_ignore_border():
    src = SyntheticSource(images_per_class=5)
    with_second = 0
    for image_id in src.ids:
        others = set(np.unique(src.load_label(image_id)).tolist()) - {0, 255, src.main_class(image_id)}
        with_second += bool(others)
    assert 0.15 <= with_second / len(src) <= 0.45

    plain = SyntheticSource(images_per_class=1, ignore_border=0)
    bordered = SyntheticSource(images_per_class=1, ignore_border=1)
    for image_id in plain.ids[:8]:
        label0, label1 = plain.load_label(image_id), bordered.load_label(image_id)
        assert 255 not in label0
        # the option changes only the labels, and only to 255
        assert np.array_equal(plain.load_image(image_id), bordered.load_image(image_id))
        changed = label0 != label1
        assert changed.any() and (label1[changed] == 255).all()
        # exactly the pixels with a differently labelled pixel within 1 px (Chebyshev) became 255
        padded = np.pad(label0, 1, mode="edge")
        h, w = label0.shape
        shifted = [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
        near_contour = np.any([s != label0 for s in shifted], axis=0)
        assert np.array_equal(changed, near_contour)


def test_returned_arrays_are_copies_of_the_cache():
    src = SyntheticSource(images_per_class=1)
    image, label = src.load_pair("syn_00003")
    image[:] = 0
    label[:] = 7
    image2, label2 = src.load_pair("syn_00003")
    assert image2.any() and not (label2 == 7).all()


def test_pickles_without_its_cache():
    src = SyntheticSource(seed=2, images_per_class=1)
    image, label = src.load_pair("syn_00004")
    clone = pickle.loads(pickle.dumps(src))  # data-loader workers started with "spawn" need this
    assert clone.fingerprint() == src.fingerprint() and clone._cache == {}
    image2, label2 = clone.load_pair("syn_00004")
    assert np.array_equal(image, image2) and np.array_equal(label, label2)


def test_generation_is_fast():
    src = SyntheticSource(seed=3, images_per_class=2)
    synthetic._photo_bank()  # loaded once per process, measured separately
    start = time.perf_counter()
    for image_id in src.ids:
        src.load_pair(image_id)
    elapsed = time.perf_counter() - start
    # about 4 ms per image on one CPU core; the bound only catches a pathological slowdown
    assert elapsed < 4.0, elapsed


def test_photos_load_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    synthetic._photo_bank.cache_clear()
    try:
        photos, loaded = synthetic._photo_bank()
        # every texture photo ships inside the scikit-image wheel: none was replaced by a stand-in
        assert loaded == synthetic._PHOTO_NAMES
        assert all(p.mode == "RGB" and min(p.size) >= 100 for p in photos)
    finally:
        synthetic._photo_bank.cache_clear()


@pytest.mark.slow
def test_whole_default_benchmark():
    src = SyntheticSource()
    start = time.perf_counter()
    counts = {c: 0 for c in range(1, 21)}
    for image_id in src.ids:
        label = src.load_label(image_id)
        for value, count in zip(*np.unique(label, return_counts=True), strict=True):
            if 0 < value < 255 and count >= PROTOCOL_MIN_PIXELS:
                counts[int(value)] += 1
    elapsed = time.perf_counter() - start
    assert len(src) == 600 and min(counts.values()) >= 30
    assert elapsed < 30.0, elapsed
