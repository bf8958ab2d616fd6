"""Fold tables of the few-shot benchmarks: which classes are novel (tested) and which are base (trained).

The protocol is data, not code scattered through loaders. Class ids are the global ones of the sources:
``1..20`` for PASCAL VOC (VOC order), ``1..80`` for COCO (category-id order), the sorted folder
position + 1 for class folders (FSS-1000).

- **PASCAL-5i** (Shaban et al. 2017, as used by PFENet, BAM, HSNet): fold ``i`` tests ``5i+1..5i+5``.
- **COCO-20i**, two conventions in the literature:
  ``"interleaved"`` - fold ``i`` tests ``{4k+i+1, k=0..19}`` (HSNet, BAM, HDMNet and most later work);
  ``"consecutive"`` - fold ``i`` tests ``20i+1..20i+20`` (PANet).
- **FSS-1000** (Wei et al. 2020): one fold; the 240 official test classes (the authors' list, shipped in
  ``dedn/resources/fss1000_test_classes.txt``) are novel, every other class of the source is base.
  FSS-1000 ids depend on the folder names present, so its table needs the source's ``class_names``.
- **synthetic**: the project's generated benchmark, 20 classes in 4 folds of 5 consecutive classes.

PASCAL, FSS-1000 and synthetic have a single table each; ``convention`` only matters for COCO.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from dedn.errors import DataError

PASCAL_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

#: the 80 COCO object categories in category-id order (ids 1..90 with gaps become 1..80)
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

CONVENTIONS = ("interleaved", "consecutive")


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's shape: ``num_classes`` is None where it depends on the data (FSS-1000)."""

    name: str
    num_classes: int | None
    num_folds: int
    conventions: tuple[str, ...]


BENCHMARKS: dict[str, Benchmark] = {
    "pascal": Benchmark("pascal", 20, 4, ("consecutive",)),
    "coco": Benchmark("coco", 80, 4, CONVENTIONS),
    "fss1000": Benchmark("fss1000", None, 1, ("official",)),
    "synthetic": Benchmark("synthetic", 20, 4, ("consecutive",)),
}


def _benchmark(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise DataError(f"unknown benchmark {name!r}; expected one of {sorted(BENCHMARKS)}") from None


def num_folds(benchmark: str) -> int:
    """Number of folds of ``benchmark``."""
    return _benchmark(benchmark).num_folds


def _check_fold(bench: Benchmark, fold: int) -> None:
    if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < bench.num_folds:
        raise DataError(
            f"fold {fold!r} does not exist for benchmark {bench.name!r}; expected 0..{bench.num_folds - 1}"
        )


def read_class_list(path: str | Path) -> list[str]:
    """Class names from a text file, one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read class list {path}: {e.strerror or e}") from None
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]


@lru_cache(maxsize=1)
def _fss1000_test_classes() -> tuple[str, ...]:
    ref = resources.files("dedn") / "resources" / "fss1000_test_classes.txt"
    with resources.as_file(ref) as path:
        return tuple(read_class_list(path))


def fss1000_test_classes() -> list[str]:
    """The 240 official FSS-1000 test class names (folder names), from the authors' repository."""
    return list(_fss1000_test_classes())


def class_ids_from_names(names: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Global ids (position in ``class_names`` + 1) of ``names``, sorted; unknown names are an error."""
    position = {n: i + 1 for i, n in enumerate(class_names)}
    missing = [n for n in names if n not in position]
    if missing:
        raise DataError(
            f"{len(missing)} class(es) not found among the source's {len(class_names)} classes: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    return sorted(position[n] for n in names)


def novel_classes(
    benchmark: str,
    fold: int,
    convention: str = "interleaved",
    class_names: Sequence[str] | None = None,
) -> list[int]:
    """The classes tested in ``fold`` (sorted global ids).

    ``convention`` selects the COCO-20i table ("interleaved" or "consecutive"); the other benchmarks have
    one table each. ``class_names`` (the source's names) is required for "fss1000" only.
    """
    bench = _benchmark(benchmark)
    _check_fold(bench, fold)
    if convention not in CONVENTIONS:
        raise DataError(f"unknown fold convention {convention!r}; expected one of {list(CONVENTIONS)}")
    if benchmark == "fss1000":
        if class_names is None:
            raise DataError("the fss1000 fold table needs the source's class_names (FSS-1000 folder names)")
        return class_ids_from_names(fss1000_test_classes(), class_names)
    assert bench.num_classes is not None
    per_fold = bench.num_classes // bench.num_folds
    if benchmark == "coco" and convention == "interleaved":
        return [bench.num_folds * k + fold + 1 for k in range(per_fold)]
    return list(range(per_fold * fold + 1, per_fold * (fold + 1) + 1))


def base_classes(
    benchmark: str,
    fold: int,
    convention: str = "interleaved",
    class_names: Sequence[str] | None = None,
) -> list[int]:
    """The classes trained on in ``fold``: every class of the benchmark that is not novel (sorted)."""
    novel = set(novel_classes(benchmark, fold, convention, class_names))
    bench = _benchmark(benchmark)
    total = len(class_names) if bench.num_classes is None and class_names is not None else bench.num_classes
    assert total is not None
    return [c for c in range(1, total + 1) if c not in novel]


def fold_table(benchmark: str, convention: str = "interleaved") -> list[list[int]]:
    """Novel classes of every fold (not available for fss1000, whose ids depend on the data)."""
    if benchmark == "fss1000":
        raise DataError("the fss1000 table depends on the folder names; use novel_classes(..., class_names=)")
    return [novel_classes(benchmark, f, convention) for f in range(num_folds(benchmark))]
