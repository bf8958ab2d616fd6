"""The few-shot protocol as data: eligible (image, class) pairs and train/validation/test splits.

Everything here works on class pixel counts (:func:`dedn.data.index.class_pixel_counts`), never on the
images, so a split of PASCAL or COCO is built in milliseconds once the index exists.

Rules (see shared/PROTOCOL.md):

- an (image, class) pair is *eligible* when the class covers at least ``MIN_PIXELS = 2 * 32 * 32`` label
  pixels (PFENet's rule, also BAM's and HDMNet's), for training and test lists alike. HSNet's PASCAL-5i
  test lists (``data/splits/pascal/val/fold*.txt`` in its repository) do not follow it: on the same masks
  they hold pairs of 1,146-2,033 pixels and miss pairs of 2,053-5,233. :func:`read_pair_list` reads such a
  list (``data.pair_list``) so that a fold can be scored on exactly its pairs;
- training pairs use base classes only. Images that also show a novel class are either kept, the novel
  pixels becoming background in the binary episode mask (``novel_in_train="keep"``, PFENet/HSNet), or
  dropped whenever any novel pixel is present (``"drop"``, BAM/HDMNet);
- the *offline PASCAL protocol* (:func:`disjoint_split`) uses one image set for everything: training images
  contain no pixel of any novel class, a fixed hold-out of them gives validation episodes on base classes,
  and the test pairs are the eligible novel pairs.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dedn.errors import DataError

#: minimum number of label pixels of a class for an (image, class) pair to count (2 * 32 * 32)
MIN_PIXELS = 2048

NOVEL_IN_TRAIN = ("keep", "drop")

Counts = Mapping[str, Mapping[int, int]]


@dataclass(frozen=True, order=True)
class Pair:
    """One (image, class) pair: the image shows at least ``min_pixels`` pixels of the class."""

    image_id: str
    class_id: int


@dataclass
class FewShotSplit:
    """Classes and pairs of one fold.

    ``train_pairs`` and ``val_pairs`` are base-class pairs (validation episodes come from ``val_pairs``, so
    checkpoints are never selected on test episodes; with ``held_out`` classes, ``val_pairs`` are theirs
    and ``base`` lists only the classes trained on); ``test_pairs`` are novel-class pairs. ``protocol``
    says how it was built ("standard-keep", "standard-drop" or "disjoint").
    """

    novel: list[int]
    base: list[int]
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    test_pairs: list[Pair]
    protocol: str = "standard-keep"
    train_images: list[str] = field(default_factory=list)
    val_images: list[str] = field(default_factory=list)
    #: base classes held out of training as pseudo-novel validation classes (:func:`hold_out_classes`);
    #: empty when validation uses held-out images of the training classes
    held_out: list[int] = field(default_factory=list)

    @property
    def val_classes(self) -> list[int]:
        """The classes of the validation episodes."""
        return self.held_out or self.base

    @property
    def test_images(self) -> list[str]:
        """Images with at least one eligible novel pair (in pair order)."""
        return list(dict.fromkeys(p.image_id for p in self.test_pairs))

    def summary(self) -> dict[str, int]:
        """Counts of images and pairs per part (for logs and result files)."""
        return {
            "train_images": len(self.train_images),
            "train_pairs": len(self.train_pairs),
            "val_images": len(self.val_images),
            "val_pairs": len(self.val_pairs),
            "test_images": len(self.test_images),
            "test_pairs": len(self.test_pairs),
        }


def eligible_pairs(counts: Counts, classes: Iterable[int], min_pixels: int = MIN_PIXELS) -> list[Pair]:
    """Pairs (image, class) with ``class in classes`` covering at least ``min_pixels`` pixels.

    Ordered by image (counts order), then class id.
    """
    wanted = set(classes)
    return [
        Pair(image_id, c)
        for image_id, cc in counts.items()
        for c in sorted(cc)
        if c in wanted and cc[c] >= min_pixels
    ]


def pairs_by_class(pairs: Iterable[Pair]) -> dict[int, list[str]]:
    """Class id -> image ids of its pairs (pair order kept), classes sorted."""
    out: dict[int, list[str]] = {}
    for p in pairs:
        out.setdefault(p.class_id, []).append(p.image_id)
    return dict(sorted(out.items()))


def holdout_fraction_of(image_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, image id) alone.

    An image is held out for validation when this is below the fraction, so its membership never depends
    on the fold, the other images or their order.
    """
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_classes(novel: Sequence[int], base: Sequence[int]) -> None:
    if not novel:
        raise DataError("no novel classes given; expected the fold's test classes")
    overlap = sorted(set(novel) & set(base))
    if overlap:
        raise DataError(f"classes {overlap} are both novel and base; a fold's classes must be disjoint")


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} is out of range; expected 0 <= fraction < 1")


def _split_holdout(images: Iterable[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    train, val = [], []
    for i in images:
        (val if holdout_fraction_of(i, seed) < val_fraction else train).append(i)
    return train, val


def standard_split(
    train_counts: Counts,
    test_counts: Counts,
    novel: Sequence[int],
    base: Sequence[int],
    novel_in_train: str = "keep",
    val_fraction: float = 0.0,
    seed: int = 0,
    min_pixels: int = MIN_PIXELS,
) -> FewShotSplit:
    """The standard protocol: training pairs from a training set, test pairs from a separate test set.

    Training uses base-class pairs of ``train_counts``; images showing a novel class are kept
    (``novel_in_train="keep"``) or dropped if any novel pixel is present (``"drop"``). With ``val_fraction``
    > 0 a fixed, seeded hold-out of the training images gives validation pairs. Test pairs are the
    eligible novel pairs of ``test_counts``.
    """
    _check_classes(novel, base)
    _check_fraction(val_fraction)
    if novel_in_train not in NOVEL_IN_TRAIN:
        raise DataError(f"novel_in_train={novel_in_train!r}; expected one of {list(NOVEL_IN_TRAIN)}")
    novel_set = set(novel)
    images = [i for i, cc in train_counts.items() if novel_in_train == "keep" or not (novel_set & set(cc))]
    train_images, val_images = _split_holdout(images, val_fraction, seed)
    train_sub = {i: train_counts[i] for i in train_images}
    val_sub = {i: train_counts[i] for i in val_images}
    return FewShotSplit(
        novel=sorted(novel),
        base=sorted(base),
        train_pairs=eligible_pairs(train_sub, base, min_pixels),
        val_pairs=eligible_pairs(val_sub, base, min_pixels),
        test_pairs=eligible_pairs(test_counts, novel, min_pixels),
        protocol=f"standard-{novel_in_train}",
        train_images=train_images,
        val_images=val_images,
    )


def disjoint_split(
    counts: Counts,
    novel: Sequence[int],
    base: Sequence[int],
    val_fraction: float = 0.1,
    seed: int = 0,
    min_pixels: int = MIN_PIXELS,
) -> FewShotSplit:
    """The offline protocol on one image set (e.g. PASCAL VOC 2012 val alone).

    Training images: those with no pixel of any novel class (so novel classes are never seen, and no
    training image is a test image); a fixed hold-out of them (``val_fraction``, chosen per image by a
    hash of (seed, id)) gives validation pairs on base classes. Test pairs: the eligible novel pairs.
    ``train_images`` and ``val_images`` include images without any eligible base pair.
    """
    _check_classes(novel, base)
    _check_fraction(val_fraction)
    novel_set = set(novel)
    clean = [i for i, cc in counts.items() if not (novel_set & set(cc))]
    train_images, val_images = _split_holdout(clean, val_fraction, seed)
    return FewShotSplit(
        novel=sorted(novel),
        base=sorted(base),
        train_pairs=eligible_pairs({i: counts[i] for i in train_images}, base, min_pixels),
        val_pairs=eligible_pairs({i: counts[i] for i in val_images}, base, min_pixels),
        test_pairs=eligible_pairs(counts, novel, min_pixels),
        protocol="disjoint",
        train_images=train_images,
        val_images=val_images,
    )


def all_classes_split(
    counts: Counts,
    classes: Sequence[int],
    val_fraction: float = 0.1,
    seed: int = 0,
    min_pixels: int = MIN_PIXELS,
) -> FewShotSplit:
    """Every class is a training class: no fold, no novel class, no test pair (``data.protocol: all``).

    For a model meant for other data (a released model, scored on a cross-domain set or used on one's own
    images), trained on everything a data set holds. A fixed hold-out of the images (``val_fraction``, as
    in :func:`disjoint_split`) gives validation pairs on the same classes.
    """
    if not classes:
        raise DataError("no classes to train on")
    _check_fraction(val_fraction)
    train_images, val_images = _split_holdout(list(counts), val_fraction, seed)
    return FewShotSplit(
        novel=[],
        base=sorted(classes),
        train_pairs=eligible_pairs({i: counts[i] for i in train_images}, classes, min_pixels),
        val_pairs=eligible_pairs({i: counts[i] for i in val_images}, classes, min_pixels),
        test_pairs=[],
        protocol="all",
        train_images=train_images,
        val_images=val_images,
    )


def cross_domain_split(
    counts: Counts, classes: Sequence[int], min_pixels: int = MIN_PIXELS, min_images: int = 0
) -> FewShotSplit:
    """A cross-domain test set: every class of the set is novel, and there is nothing to train on.

    A model trained on another benchmark (e.g. an offline PASCAL-5i fold) is scored on these test pairs
    next to the training-free methods, on the same episode files. ``train_images`` and ``val_images`` are
    empty: training or validating on such a split is an error of the caller's (``dedn train`` says so).
    ``min_images``: a class with fewer eligible images than this is left out (neither scored nor drawn),
    as sets of many rare classes need (Clothing Co-Parsing: 58 classes, 25 with 5 images per split).
    """
    if not classes:
        raise DataError("no classes given for the cross-domain test set")
    pairs = eligible_pairs(counts, classes, min_pixels)
    per_class = Counter(p.class_id for p in pairs)
    kept = sorted(c for c in classes if per_class[c] >= min_images)
    if not kept:
        raise DataError(
            f"no class of the cross-domain set has {min_images} images with {min_pixels} pixels of it; "
            "lower data.min_class_images"
        )
    return FewShotSplit(
        novel=kept,
        base=[],
        train_pairs=[],
        val_pairs=[],
        test_pairs=[p for p in pairs if p.class_id in set(kept)],
        protocol="cross",
    )


def read_pair_list(path: str | os.PathLike, counts: Counts, classes: Sequence[int]) -> list[Pair]:
    """Test pairs from a list file in HSNet's format: one ``<image id>__<class id>`` per line, the class
    id 1-based in the benchmark's class order (``2007_000033__1``; zero-padded ids such as ``__01`` are
    read too). Blank lines and lines starting with ``#`` are skipped, repeated pairs are kept once.

    The pairs replace the fold's eligible test pairs as they are: no pixel threshold is applied (HSNet's
    lists do not follow the 2,048-pixel rule). Every pair must name an image of the test set (``counts``),
    one of ``classes`` (the fold's novel classes), and an image that shows at least one pixel of it;
    otherwise DataError names the file, the line and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pair list {path} does not exist")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"pair list {path}: cannot be read as text ({e})") from None
    wanted = set(classes)
    pairs: list[Pair] = []
    seen: set[Pair] = set()
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"pair list {path}, line {number} ({line!r})"
        image_id, sep, class_text = line.rpartition("__")
        if not sep or not image_id or not class_text.isdigit():
            raise DataError(f"{where}: expected <image id>__<class id>, e.g. 2007_000033__1")
        class_id = int(class_text)
        if class_id not in wanted:
            raise DataError(f"{where}: class {class_id} is not a novel class of this fold ({sorted(wanted)})")
        if image_id not in counts:
            raise DataError(f"{where}: image {image_id!r} is not in the test set")
        if counts[image_id].get(class_id, 0) <= 0:
            raise DataError(f"{where}: image {image_id!r} shows no pixel of class {class_id}")
        pair = Pair(image_id, class_id)
        if pair not in seen:
            seen.add(pair)
            pairs.append(pair)
    if not pairs:
        raise DataError(f"pair list {path} holds no pair")
    return pairs


def hold_out_classes(
    split: FewShotSplit, counts: Counts, classes: Sequence[int], min_pixels: int = MIN_PIXELS
) -> FewShotSplit:
    """``split`` with some base classes turned into pseudo-novel validation classes.

    Every training or validation image of ``split`` that shows any pixel of ``classes`` leaves training
    (as a novel class's images do under the disjoint protocol); validation pairs are the eligible pairs of
    ``classes`` in those images, and training keeps the other base classes. A model can thus be validated
    on classes it never saw, as it is tested. ``counts``: the class pixel counts of the training images.
    """
    held = sorted(set(classes))
    if not held:
        raise DataError("no classes to hold out for validation; expected some of the fold's base classes")
    not_base = [c for c in held if c not in split.base]
    if not_base:
        raise DataError(
            f"validation classes {not_base} are not base classes of this fold (base classes: {split.base})"
        )
    kept = [c for c in split.base if c not in held]
    if not kept:
        raise DataError("holding out every base class leaves nothing to train on")
    held_set = set(held)
    pool = split.train_images + split.val_images
    val_images = [i for i in pool if held_set & set(counts[i])]
    train_images = [i for i in pool if not held_set & set(counts[i])]
    return FewShotSplit(
        novel=split.novel,
        base=kept,
        train_pairs=eligible_pairs({i: counts[i] for i in train_images}, kept, min_pixels),
        val_pairs=eligible_pairs({i: counts[i] for i in val_images}, held, min_pixels),
        test_pairs=split.test_pairs,
        protocol=split.protocol,
        train_images=train_images,
        val_images=val_images,
        held_out=held,
    )
