"""Per-image class pixel counts: the one pass over the labels that every split and episode list needs.

The scan decodes every label once and is cached as JSON under
``cache_dir()/index/<source.name>-<fingerprint>.json``; the fingerprint changes when the files change, so
a stale cache is never read. Images themselves are not decoded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dedn.data.base import IGNORE_INDEX, SegmentationSource
from dedn.errors import DataError
from dedn.utils.io import atomic_write_json, cache_dir

_FORMAT = "dedn-class-index"
_VERSION = 1

ClassCounts = dict[str, dict[int, int]]


def ignore_value(source: SegmentationSource) -> int | None:
    """The ignore label of ``source``: 255, or None for sources with 255+ classes (255 is a class there)."""
    return IGNORE_INDEX if source.num_classes < IGNORE_INDEX else None


def index_path(source: SegmentationSource, cache_root: str | os.PathLike | None = None) -> Path:
    """Where the cached index of ``source`` lives (``cache_root`` defaults to :func:`cache_dir`)."""
    root = Path(cache_root) if cache_root is not None else cache_dir()
    return root / "index" / f"{source.name}-{source.fingerprint()}.json"


def label_counts(source: SegmentationSource, image_id: str) -> dict[int, int]:
    """Pixel count per class present in one label (background and ignore excluded), checking the values."""
    # _read_label + bincount instead of load_label: load_label's np.unique check would double the scan
    # time, and the bincount already shows every value present
    label = source._read_label(image_id)
    bins = np.bincount(label.ravel(), minlength=IGNORE_INDEX + 1)
    ignore = ignore_value(source)
    present = np.flatnonzero(bins)
    bad = [int(v) for v in present if v > source.num_classes and v != ignore]
    if bad:
        raise DataError(
            f"{source.describe(image_id)}: mask has values {bad[:10]}; expected 0 (background), "
            f"1..{source.num_classes} (classes)" + (f" or {ignore} (ignore)" if ignore is not None else "")
        )
    return {int(v): int(bins[v]) for v in present if v != 0 and v != ignore}


def class_pixel_counts(
    source: SegmentationSource,
    use_cache: bool = True,
    progress: bool = False,
    cache_root: str | os.PathLike | None = None,
) -> ClassCounts:
    """Per image id (in ``source.ids`` order), the pixel count of every class present in its label.

    Background (0) and ignore (255) are excluded. With ``use_cache`` the result is read from / written to
    ``index_path(source, cache_root)``.
    """
    path = index_path(source, cache_root) if use_cache else None
    if path is not None and path.is_file():
        cached = _read_cache(path, source)
        if cached is not None:
            return cached
    ids = source.ids
    iterator = ids
    if progress:
        from tqdm import tqdm

        iterator = tqdm(ids, desc=f"indexing {source.name}", unit="img")
    counts: ClassCounts = {image_id: label_counts(source, image_id) for image_id in iterator}
    if path is not None:
        atomic_write_json(
            path,
            {
                "format": _FORMAT,
                "version": _VERSION,
                "source": source.name,
                "fingerprint": path.stem.rsplit("-", 1)[-1],
                "num_classes": source.num_classes,
                # JSON object keys must be strings; class ids are turned back into ints on reading
                "counts": {i: {str(c): n for c, n in cc.items()} for i, cc in counts.items()},
            },
            indent=None,
        )
    return counts


def _read_cache(path: Path, source: SegmentationSource) -> ClassCounts | None:
    """The cached counts, or None when the file is unusable (then the scan simply runs again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            return None
        raw = data["counts"]
        if list(raw) != list(source.ids):
            return None
        return {i: {int(c): int(n) for c, n in cc.items()} for i, cc in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def images_by_class(counts: ClassCounts) -> dict[int, list[str]]:
    """Class id -> image ids containing at least one pixel of it (in counts order)."""
    out: dict[int, list[str]] = {}
    for image_id, cc in counts.items():
        for c in cc:
            out.setdefault(c, []).append(image_id)
    return dict(sorted(out.items()))
