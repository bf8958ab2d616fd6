"""PASCAL VOC layout reader, and the image/mask decoding helpers every file-based reader shares.

Layout (as in the SegmentationClassAug release used by PFENet, BAM and HSNet)::

    root/JPEGImages/<id>.jpg
    root/SegmentationClassAug/<id>.png     palette PNG: 0 background, 1..20 classes, 255 ignore
    root/<split>.txt  or  root/ImageSets/Segmentation/<split>.txt

Nothing is decoded until an image or label is asked for; the id list comes from the list file (or, without
one, from listing the label folder).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dedn.data.base import SegmentationSource, files_fingerprint
from dedn.data.folds import PASCAL_CLASSES
from dedn.errors import DataError

# PIL raises these for missing, truncated or undecodable files (SyntaxError for some broken headers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file as (H, W, 3) uint8 RGB (grayscale, palette, CMYK and RGBA are converted).

    EXIF orientation is deliberately NOT applied: masks are drawn on the stored pixel grid.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here with its name
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {path}: {e}; expected a readable JPEG/PNG image") from None


def read_mask(path: str | os.PathLike, allow_color: bool = False) -> np.ndarray:
    """Decode a mask PNG as a 2-D integer array of the stored values.

    Palette ("P") PNGs give their palette indices (the VOC convention), grayscale ones their gray values.
    Colour masks are an error unless ``allow_color`` (then they are converted to gray luminance, which
    keeps 0/255 binary masks saved as RGB intact).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                if not allow_color:
                    raise DataError(
                        f"mask {path} is a {mode} image; expected a palette (P) or grayscale (L) PNG whose "
                        f"values are class indices"
                    )
                im = im.convert("L")
            elif mode == "1":
                im = im.convert("L")
            arr = np.asarray(im)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"mask file not found: {path}") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode mask {path}: {e}; expected a readable PNG") from None
    if arr.ndim != 2:
        raise DataError(f"mask {path} has shape {arr.shape}; expected a single-channel (H, W) image")
    return arr


def read_list_file(path: Path) -> list[str]:
    """Ids from a list file: first token of each non-empty line, folder and extension removed.

    Accepts plain id lists (``2007_000033``) and PFENet-style pair lists
    (``JPEGImages/2007_000033.jpg SegmentationClassAug/2007_000033.png``). Duplicates are dropped (first
    occurrence kept) so that per-image statistics count every image once.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read list file {path}: {e.strerror or e}") from None
    ids: dict[str, None] = {}
    for line in lines:
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        ids.setdefault(Path(tokens[0]).stem, None)
    if not ids:
        raise DataError(f"list file {path} contains no image ids")
    return list(ids)


def find_list_file(split: str | os.PathLike, folders: Sequence[Path]) -> Path:
    """The list file of ``split``: a given path (``*.txt`` or with a folder), else ``<folder>/<split>.txt``
    in the first of ``folders`` that has it."""
    given = Path(split)
    candidates = [given] if given.suffix == ".txt" or len(given.parts) > 1 else []
    candidates += [folder / f"{split}.txt" for folder in folders]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"split list {str(split)!r} not found; looked for {', '.join(map(str, candidates))}")


class VOCSource(SegmentationSource):
    """PASCAL VOC images with ``SegmentationClassAug`` labels (classes 1..20 in VOC order).

    ``split`` is a split name (``root/<split>.txt`` or ``root/ImageSets/Segmentation/<split>.txt``), a path to
    a list file, or None (every label in the label folder). ``ids`` overrides ``split`` with an explicit list.
    """

    name = "pascal"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | os.PathLike | None = "val",
        ids: Sequence[str] | None = None,
        image_dir: str = "JPEGImages",
        label_dir: str = "SegmentationClassAug",
    ):
        self._fingerprint: str | None = None  # computed once: it reads the label files
        super().__init__(PASCAL_CLASSES)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"PASCAL VOC root {self.root} does not exist or is not a folder")
        self.image_dir = self.root / image_dir
        self.label_dir = self.root / label_dir
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                raise DataError(
                    f"PASCAL VOC folder {folder} is missing; expected {image_dir}/ and {label_dir}/ in it"
                )
        self.list_file: Path | None = None
        if ids is not None:
            self._ids = list(dict.fromkeys(str(i) for i in ids))
        elif split is None:
            self._ids = sorted(p.stem for p in self.label_dir.glob("*.png"))
            if not self._ids:
                raise DataError(f"no label PNGs found in {self.label_dir}")
        else:
            self.list_file = self._find_list(split)
            self._ids = read_list_file(self.list_file)

    def _find_list(self, split: str | os.PathLike) -> Path:
        return find_list_file(split, [self.root, self.root / "ImageSets" / "Segmentation"])

    @property
    def ids(self) -> list[str]:
        return self._ids

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / f"{image_id}.jpg"

    def label_path(self, image_id: str) -> Path:
        return self.label_dir / f"{image_id}.png"

    def describe(self, image_id: str) -> str:
        return f"{self.image_path(image_id)} (mask {self.label_path(image_id)})"

    def _read_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.image_path(image_id))

    def _read_label(self, image_id: str) -> np.ndarray:
        label = read_mask(self.label_path(image_id))
        if label.dtype != np.uint8:
            if label.size and (label.min() < 0 or label.max() > 255):
                raise DataError(
                    f"mask {self.label_path(image_id)} has values up to {int(label.max())}; expected 0 "
                    f"(background), 1..{self.num_classes} (classes) or 255 (ignore)"
                )
            label = label.astype(np.uint8)
        return label

    def fingerprint(self) -> str:
        if self._fingerprint is not None:
            return self._fingerprint
        images = [self.image_path(i) for i in self._ids]
        labels = [self.label_path(i) for i in self._ids]
        try:
            extra = f"voc|{self.image_dir.name}|{self.label_dir.name}"
            self._fingerprint = files_fingerprint(images, extra=extra, hashed=labels)
            return self._fingerprint
        except FileNotFoundError as e:
            raise DataError(f"file listed in the split is missing: {e.filename}") from None
