"""The data layer on the real offline data (../shared/data): PASCAL VOC 2012 val and the COCO micro set.

Each source is indexed once per test session (session-scoped fixtures with their own cache folder).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from dedn.data.coco import COCOSource
from dedn.data.episodes import EpisodeDataset, sample_test_episodes
from dedn.data.folds import COCO_CLASSES, PASCAL_CLASSES, base_classes, novel_classes
from dedn.data.index import class_pixel_counts, index_path
from dedn.data.protocol import disjoint_split, eligible_pairs, standard_split
from dedn.data.voc import VOCSource

pytestmark = pytest.mark.realdata

# measured on this copy of the data (shared/data/README.md)
PASCAL_TEST_IMAGES = [364, 445, 592, 336]
PASCAL_TEST_PAIRS = [365, 467, 734, 357]
PASCAL_TRAIN_IMAGES = [1016, 970, 802, 1095]


@pytest.fixture(scope="session")
def index_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("index-cache")


@pytest.fixture(scope="session")
def pascal(pascal_root, index_cache):
    source = VOCSource(pascal_root, split="val")
    return source, class_pixel_counts(source, cache_root=index_cache)


@pytest.fixture(scope="session")
def coco(coco_root, index_cache):
    sources = {split: COCOSource(coco_root, split) for split in ("train2017", "val2017")}
    return {split: (s, class_pixel_counts(s, cache_root=index_cache)) for split, s in sources.items()}


# --------------------------------------------------------------------------------------------- PASCAL
def test_pascal_source(pascal):
    source, counts = pascal
    assert len(source) == 1449 and list(counts) == source.ids
    assert source.ids[0] == "2007_000033"
    assert set().union(*counts.values()) == set(range(1, 21))
    image, label = source.load_pair(source.ids[0])
    assert image.dtype == np.uint8 and image.shape == (*label.shape, 3)
    assert source.class_names == list(PASCAL_CLASSES)


@pytest.mark.parametrize("fold", range(4))
def test_pascal_offline_protocol_counts(pascal, fold):
    _, counts = pascal
    split = disjoint_split(counts, novel_classes("pascal", fold), base_classes("pascal", fold))
    assert len(split.test_images) == PASCAL_TEST_IMAGES[fold]
    assert len(split.test_pairs) == PASCAL_TEST_PAIRS[fold]
    assert len(split.train_images) + len(split.val_images) == PASCAL_TRAIN_IMAGES[fold]
    assert not set(split.test_images) & set(split.train_images + split.val_images)
    assert 0.07 < len(split.val_images) / PASCAL_TRAIN_IMAGES[fold] < 0.13


def test_pascal_index_cache_is_reused(pascal, index_cache):
    source, counts = pascal
    assert index_path(source, index_cache).is_file()
    start = time.perf_counter()
    again = class_pixel_counts(VOCSource(source.root, split="val"), cache_root=index_cache)
    assert again == counts
    assert time.perf_counter() - start < 1.0  # no second scan (a scan takes about a second)


def test_pascal_episodes(pascal):
    source, counts = pascal
    split = disjoint_split(counts, novel_classes("pascal", 0), base_classes("pascal", 0))
    episodes = sample_test_episodes(split.test_pairs, n=1000, shots=5, seed=0, class_names=source.class_names)
    assert len(episodes) == 1000 and {e.class_id for e in episodes} == set(range(1, 6))
    eligible = {(p.image_id, p.class_id) for p in split.test_pairs}
    assert all((s, e.class_id) in eligible for e in episodes[:200] for s in e.supports)

    def stand_in(image, label, size=64):  # nearest resize; keeps the check independent of transforms.py
        rows = np.arange(size) * label.shape[0] // size
        cols = np.arange(size) * label.shape[1] // size
        image_t = image[rows][:, cols].transpose(2, 0, 1).astype(np.float32) / 255.0
        return image_t, label[rows][:, cols].astype(np.int64), (size, size)

    item = EpisodeDataset(source, episodes[:1], stand_in)[0]
    assert item["support_images"].shape == (5, 3, 64, 64) and item["query_mask"].shape == (64, 64)
    query_label = item["query_label"]
    assert tuple(query_label.shape) == source.load_label(episodes[0].query).shape
    assert set(query_label.unique().tolist()) <= {0, 1, 255} and (query_label == 1).sum() >= 2048


# ----------------------------------------------------------------------------------------------- COCO
def test_coco_reads_every_image_with_matching_masks(coco):
    total = 0
    for source, counts in coco.values():
        assert source.class_names == list(COCO_CLASSES) and len(source.category_to_class) == 80
        assert source.category_to_class[1] == 1 and source.category_to_class[44] == 40
        assert source.category_to_class[90] == 80
        crowd_images = 0
        for image_id in source.ids:
            image, label = source.load_pair(image_id)  # checks values and that the sizes agree
            rec = source._images[image_id]
            assert image.shape == (rec["height"], rec["width"], 3) and image.dtype == np.uint8
            crowd_images += bool((label == 255).any())
            total += 1
        assert crowd_images > 0  # crowd regions became ignore somewhere
        assert sum(len(cc) for cc in counts.values()) > len(source)
    assert total == 160 + 158


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_coco_labels_agree_with_pycocotools(coco, capsys):
    """Cross-check against pycocotools' own COCO API on val2017: class c pixels lie inside the union of the
    category's non-crowd instance masks, and every non-crowd instance pixel carries an object class."""
    from pycocotools.coco import COCO

    source, _ = coco["val2017"]
    with warnings.catch_warnings():
        api = COCO(str(source.annotation_file))
    capsys.readouterr()  # COCO() prints progress
    for image_id in source.ids[:60]:
        rec = source._images[image_id]
        label = source.load_label(image_id)
        objects = np.zeros(label.shape, bool)
        per_class: dict[int, np.ndarray] = {}
        for ann in api.loadAnns(api.getAnnIds(imgIds=rec["id"], iscrowd=False)):
            m = api.annToMask(ann).astype(bool)
            objects |= m
            c = source.category_to_class[ann["category_id"]]
            per_class[c] = per_class.get(c, np.zeros_like(m)) | m
        assert ((label > 0) & (label < 255) == objects).all(), image_id
        for c in set(np.unique(label).tolist()) - {0, 255}:
            assert not ((label == c) & ~per_class[c]).any(), (image_id, c)


@pytest.mark.parametrize("convention", ["interleaved", "consecutive"])
def test_coco_20i_conventions_on_real_annotations(coco, convention):
    _, train_counts = coco["train2017"]
    _, val_counts = coco["val2017"]
    all_val_pairs = set(eligible_pairs(val_counts, range(1, 81)))
    test_union = set()
    for fold in range(4):
        novel = novel_classes("coco", fold, convention)
        base = base_classes("coco", fold, convention)
        keep = standard_split(train_counts, val_counts, novel, base, novel_in_train="keep")
        drop = standard_split(train_counts, val_counts, novel, base, novel_in_train="drop")
        assert keep.test_pairs and all(p.class_id in novel for p in keep.test_pairs)
        assert all(p.class_id in base for p in keep.train_pairs + drop.train_pairs)
        assert not any(set(train_counts[i]) & set(novel) for i in drop.train_images)
        # real COCO images often show several classes: "drop" must remove some images "keep" uses
        assert len(drop.train_pairs) < len(keep.train_pairs)
        assert set(drop.train_pairs) <= set(keep.train_pairs)
        test_union |= set(keep.test_pairs)
    assert test_union == all_val_pairs  # the four folds partition the classes


def test_coco_conventions_differ(coco):
    _, val_counts = coco["val2017"]
    a = standard_split(val_counts, val_counts, novel_classes("coco", 0), base_classes("coco", 0))
    b = standard_split(
        val_counts,
        val_counts,
        novel_classes("coco", 0, "consecutive"),
        base_classes("coco", 0, "consecutive"),
    )
    assert {p.class_id for p in a.test_pairs} != {p.class_id for p in b.test_pairs}
    assert 1 in {p.class_id for p in a.test_pairs} & {p.class_id for p in b.test_pairs}  # person in both
