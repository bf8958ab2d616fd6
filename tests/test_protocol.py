"""Fold tables, the eligibility rule and the train/validation/test splits."""

from __future__ import annotations

import pytest

from dedn.data.folds import (
    BENCHMARKS,
    COCO_CLASSES,
    PASCAL_CLASSES,
    base_classes,
    fold_table,
    fss1000_test_classes,
    novel_classes,
    num_folds,
)
from dedn.data.protocol import (
    MIN_PIXELS,
    Pair,
    disjoint_split,
    eligible_pairs,
    hold_out_classes,
    holdout_fraction_of,
    pairs_by_class,
    standard_split,
)
from dedn.errors import DataError


# ---------------------------------------------------------------------------------------- fold tables
def test_pascal_folds():
    assert len(PASCAL_CLASSES) == 20 and num_folds("pascal") == 4
    assert novel_classes("pascal", 0) == [1, 2, 3, 4, 5]
    assert [PASCAL_CLASSES[c - 1] for c in novel_classes("pascal", 2)] == [
        "diningtable", "dog", "horse", "motorbike", "person"
    ]  # fmt: skip
    assert novel_classes("pascal", 3) == [16, 17, 18, 19, 20]
    assert base_classes("pascal", 1) == [1, 2, 3, 4, 5] + list(range(11, 21))


def test_coco_folds_both_conventions():
    assert len(COCO_CLASSES) == 80 and COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"
    assert novel_classes("coco", 0)[:4] == [1, 5, 9, 13] and novel_classes("coco", 0)[-1] == 77
    assert novel_classes("coco", 3, "interleaved") == list(range(4, 81, 4))
    assert novel_classes("coco", 1, "consecutive") == list(range(21, 41))
    for convention in ("interleaved", "consecutive"):
        table = fold_table("coco", convention)
        assert sorted(c for fold in table for c in fold) == list(range(1, 81))  # a partition
        assert all(len(fold) == 20 for fold in table)
        assert len(base_classes("coco", 2, convention)) == 60


def test_synthetic_folds():
    assert fold_table("synthetic") == [list(range(5 * f + 1, 5 * f + 6)) for f in range(4)]
    assert BENCHMARKS["synthetic"].num_classes == 20


def test_fss1000_fold_uses_the_official_test_list():
    test = fss1000_test_classes()
    assert len(test) == 240 and len(set(test)) == 240 and test[0] == "bus" and "tower_pisa" in test
    class_names = sorted([*test, "zz_extra", "aa_extra"])
    novel = novel_classes("fss1000", 0, class_names=class_names)
    assert len(novel) == 240
    assert base_classes("fss1000", 0, class_names=class_names) == [1, 242]
    with pytest.raises(DataError, match="needs the source's class_names"):
        novel_classes("fss1000", 0)
    with pytest.raises(DataError, match=r"240 class\(es\) not found"):
        novel_classes("fss1000", 0, class_names=["a", "b"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("pascal", 4), r"fold 4 does not exist for benchmark 'pascal'; expected 0\.\.3"),
        (("coco", -1), "fold -1 does not exist"),
        (("fss1000", 1), r"expected 0\.\.0"),
        (("imagenet", 0), "unknown benchmark 'imagenet'"),
        (("coco", 0, "diagonal"), "unknown fold convention 'diagonal'"),
    ],
)
def test_bad_folds(args, message):
    with pytest.raises(DataError, match=message):
        novel_classes(*args)


# -------------------------------------------------------------------------------------- eligibility
COUNTS = {
    "a": {1: MIN_PIXELS, 2: MIN_PIXELS - 1, 7: 50_000},
    "b": {7: 3000},
    "c": {2: 10},  # novel class present, but too small to be a test pair
    "d": {},
    "e": {8: 4000, 9: 4000},
}


def test_eligibility_threshold():
    assert MIN_PIXELS == 2 * 32 * 32
    assert eligible_pairs(COUNTS, [1, 2]) == [Pair("a", 1)]  # 2048 counts, 2047 does not
    assert eligible_pairs(COUNTS, [2], min_pixels=10) == [Pair("a", 2), Pair("c", 2)]
    assert eligible_pairs(COUNTS, [7, 8, 9]) == [Pair("a", 7), Pair("b", 7), Pair("e", 8), Pair("e", 9)]
    assert pairs_by_class(eligible_pairs(COUNTS, [7, 8, 9])) == {7: ["a", "b"], 8: ["e"], 9: ["e"]}


def test_standard_split_keep_and_drop():
    novel, base = [1, 2], [7, 8, 9]
    keep = standard_split(COUNTS, COUNTS, novel, base, novel_in_train="keep")
    drop = standard_split(COUNTS, COUNTS, novel, base, novel_in_train="drop")
    # "keep": image a (with novel classes 1 and 2) still gives its base pair; its novel pixels become
    # background when the episode mask is binarised for class 7
    assert Pair("a", 7) in keep.train_pairs
    # "drop": any novel pixel removes the image, even an ineligible one (c has 10 pixels of class 2)
    assert all(p.image_id not in ("a", "c") for p in drop.train_pairs)
    assert "c" not in drop.train_images and "c" in keep.train_images
    assert drop.train_pairs == [Pair("b", 7), Pair("e", 8), Pair("e", 9)]
    for split in (keep, drop):
        assert all(p.class_id in base for p in split.train_pairs)
        assert split.test_pairs == [Pair("a", 1)]
        assert split.val_pairs == []
    assert keep.protocol == "standard-keep" and drop.protocol == "standard-drop"
    with pytest.raises(DataError, match="novel_in_train='ignore'"):
        standard_split(COUNTS, COUNTS, novel, base, novel_in_train="ignore")
    with pytest.raises(DataError, match=r"classes \[7\] are both novel and base"):
        standard_split(COUNTS, COUNTS, [1, 7], base)


def _many_counts(n: int) -> dict[str, dict[int, int]]:
    # image k shows class 1 + k % 6 (big) and, every third image, class 2 a little
    counts = {}
    for k in range(n):
        cc = {1 + k % 6: 5000}
        if k % 3 == 0:
            cc[2] = 100
        counts[f"img{k:04d}"] = cc
    return counts


def test_disjoint_split():
    counts = _many_counts(600)
    novel, base = [1, 2], [3, 4, 5, 6]
    split = disjoint_split(counts, novel, base, val_fraction=0.1, seed=0)
    trainval = split.train_images + split.val_images
    assert not set(split.train_images) & set(split.val_images)
    # training/validation images have no pixel of a novel class; every other image is one of them
    assert set(trainval) == {i for i, cc in counts.items() if not set(cc) & set(novel)}
    assert not {p.image_id for p in split.test_pairs} & set(trainval)
    assert all(p.class_id in novel for p in split.test_pairs)
    assert all(p.class_id in base for p in split.train_pairs + split.val_pairs)
    assert {p.image_id for p in split.val_pairs} <= set(split.val_images)
    assert 0.06 < len(split.val_images) / len(trainval) < 0.14
    assert split.test_pairs == eligible_pairs(counts, novel)
    s = split.summary()
    assert s["test_pairs"] == len(split.test_pairs) and s["test_images"] == len(split.test_images)


def test_holdout_is_stable():
    counts = _many_counts(600)
    a = disjoint_split(counts, [1, 2], [3, 4, 5, 6], seed=0)
    # another fold, a subset of the images, a different order: an image's membership never changes
    subset = dict(reversed(list(counts.items())[::2]))
    b = disjoint_split(subset, [5], [1, 2, 3, 4, 6], seed=0)
    common = set(a.train_images + a.val_images) & set(b.train_images + b.val_images)
    assert {i for i in common if i in a.val_images} == {i for i in common if i in b.val_images}
    assert set(b.val_images) & set(a.val_images)  # the comparison above is not vacuous
    c = disjoint_split(counts, [1, 2], [3, 4, 5, 6], seed=1)
    assert set(c.val_images) != set(a.val_images)
    assert holdout_fraction_of("img0001", 0) == holdout_fraction_of("img0001", 0)
    with pytest.raises(DataError, match="val_fraction 1.5"):
        disjoint_split(counts, [1], [2], val_fraction=1.5)
    with pytest.raises(DataError, match="no novel classes"):
        disjoint_split(counts, [], [2])


def test_held_out_classes_are_never_trained_on_and_alone_make_validation():
    counts = {
        "a": {3: 5000},
        "b": {3: 5000, 5: 3000},  # shows a held-out class: leaves training with its class-3 pair
        "c": {5: 3000, 6: 100},  # too little of 6 to be a pair, enough pixels to leave training
        "d": {6: 100, 4: 4000},
        "e": {1: 5000},  # novel: a test image
    }
    split = disjoint_split(counts, [1], [3, 4, 5, 6], val_fraction=0.5)
    held = hold_out_classes(split, counts, [5, 6])
    assert held.base == [3, 4] and held.held_out == [5, 6] and held.val_classes == [5, 6]
    assert sorted(held.train_images) == ["a"] and sorted(held.val_images) == ["b", "c", "d"]
    assert held.train_pairs == [Pair("a", 3)]
    assert held.val_pairs == [Pair("b", 5), Pair("c", 5)]
    assert held.test_pairs == split.test_pairs == [Pair("e", 1)]
    assert split.val_classes == split.base == [3, 4, 5, 6]  # without held-out classes: the base classes
    with pytest.raises(DataError, match=r"validation classes \[1\] are not base classes"):
        hold_out_classes(split, counts, [1, 5])
    with pytest.raises(DataError, match="leaves nothing to train on"):
        hold_out_classes(split, counts, [3, 4, 5, 6])
    with pytest.raises(DataError, match="no classes to hold out"):
        hold_out_classes(split, counts, [])
