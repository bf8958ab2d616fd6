"""Class-folder reader: FSS-1000's layout, and the simplest way to bring one's own data.

Layout::

    root/<class>/<name>.jpg     the image
    root/<class>/<name>.png     its binary mask (foreground = the folder's class)

Class index = position of the folder name in sorted order + 1 (hidden folders are skipped). Masks may be
0/255 or 0/1 (a 0/1 mask may also use 255 for ignore); anything else is an error unless ``threshold`` is
given (HSNet reads FSS-1000 masks as ``value >= 128``), or ``mask_value`` names the foreground value.

Labels are uint8 while there are fewer than 255 classes. With 255 or more (FSS-1000 has 1,000) they are
uint16 and the value 255 is a class like any other, so such a source has no ignore value (see
:func:`dedn.data.index.ignore_value`); ignore pixels in its masks are then an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dedn.data.base import IGNORE_INDEX, SegmentationSource, files_fingerprint
from dedn.data.voc import read_mask, read_rgb
from dedn.errors import DataError

DEFAULT_IMAGE_EXTS = (".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ClassFolderSource(SegmentationSource):
    """One folder per class, each image next to a same-named binary mask."""

    name = "folders"

    def __init__(
        self,
        root: str | os.PathLike,
        image_exts: Sequence[str] = DEFAULT_IMAGE_EXTS,
        mask_value: int | None = None,
        threshold: int | None = None,
        classes: Sequence[str] | None = None,
        mask_suffix: str = ".png",
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"class-folder root {self.root} does not exist or is not a folder")
        self.image_exts = tuple(e.lower() for e in image_exts)
        self.mask_suffix = mask_suffix
        if mask_suffix.lower() in self.image_exts:
            raise DataError(
                f"mask suffix {mask_suffix!r} is also an image extension {self.image_exts}; use a distinct "
                "suffix such as '_mask.png'"
            )
        if mask_value is not None and threshold is not None:
            raise DataError("give either mask_value or threshold, not both")
        self.mask_value = mask_value
        self.threshold = threshold
        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if classes is not None:
            missing = [c for c in classes if c not in folders]
            if missing:
                raise DataError(f"class folder(s) {missing[:10]} not found under {self.root}")
            folders = sorted(dict.fromkeys(classes))
        if not folders:
            raise DataError(f"no class folders under {self.root}; expected root/<class>/<name>.jpg + .png")
        self._fingerprint: str | None = None  # computed once: it reads the label files
        super().__init__(folders)
        self.class_index = {c: i + 1 for i, c in enumerate(folders)}
        self._label_dtype = np.uint8 if self.num_classes < IGNORE_INDEX else np.uint16
        self._ids: list[str] | None = None
        self._files: dict[str, Path] = {}

    def _list(self) -> list[str]:
        ids: list[str] = []
        for cls in self.class_names:
            folder = self.root / cls
            names = {e.name for e in os.scandir(folder) if e.is_file()}
            for fname in sorted(names):
                stem, ext = os.path.splitext(fname)
                if ext.lower() not in self.image_exts or fname.endswith(self.mask_suffix):
                    continue
                if stem + self.mask_suffix not in names:
                    mask = folder / (stem + self.mask_suffix)
                    raise DataError(f"image {folder / fname} has no mask {mask}")
                image_id = f"{cls}/{stem}"
                if image_id in self._files:
                    raise DataError(f"two images in {folder} share the name {stem!r} ({fname})")
                self._files[image_id] = folder / fname
                ids.append(image_id)
        if not ids:
            raise DataError(f"no images with masks found under {self.root}")
        return ids

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = self._list()
        return self._ids

    def _split(self, image_id: str) -> tuple[str, str]:
        cls, _, stem = image_id.partition("/")
        if cls not in self.class_index or not stem:
            raise DataError(f"image id {image_id!r} is not of the form <class>/<name> with a known class")
        return cls, stem

    def image_path(self, image_id: str) -> Path:
        self.ids  # noqa: B018 - the listing fills the id -> file table
        try:
            return self._files[image_id]
        except KeyError:
            raise DataError(f"image id {image_id!r} not found under {self.root}") from None

    def mask_path(self, image_id: str) -> Path:
        cls, stem = self._split(image_id)
        return self.root / cls / (stem + self.mask_suffix)

    def describe(self, image_id: str) -> str:
        return f"{self.image_path(image_id)} (mask {self.mask_path(image_id)})"

    def _read_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.image_path(image_id))

    def _read_label(self, image_id: str) -> np.ndarray:
        cls, _ = self._split(image_id)
        path = self.mask_path(image_id)
        raw = read_mask(path, allow_color=True)
        foreground, ignore = self._binarize(raw, path)
        label = np.zeros(raw.shape, dtype=self._label_dtype)
        label[foreground] = self.class_index[cls]
        if ignore is not None and ignore.any():
            if self._label_dtype != np.uint8:
                raise DataError(
                    f"mask {path} has ignore pixels (255), which a source with {self.num_classes} classes "
                    "cannot represent (255 is a class id there); use 0/255 or 0/1 masks"
                )
            label[ignore] = IGNORE_INDEX
        return label

    def _binarize(self, raw: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
        if self.threshold is not None:
            return raw >= self.threshold, None
        values = set(np.unique(raw).tolist())
        if self.mask_value is not None:
            allowed = {0, self.mask_value} | ({IGNORE_INDEX} if self.mask_value != IGNORE_INDEX else set())
            expected = f"0 (background), {self.mask_value} (foreground)" + (
                f" or {IGNORE_INDEX} (ignore)" if self.mask_value != IGNORE_INDEX else ""
            )
            fg_value = self.mask_value
        elif values <= {0, 255}:
            return raw == 255, None
        else:
            allowed = {0, 1, IGNORE_INDEX}
            expected = "0/255 (background/foreground) or 0/1 (with 255 = ignore)"
            fg_value = 1
        bad = sorted(values - allowed)
        if bad:
            raise DataError(
                f"mask {path} has values {bad[:10]}; expected {expected}. For soft or anti-aliased masks "
                "pass threshold=128"
            )
        ignore = raw == IGNORE_INDEX if fg_value != IGNORE_INDEX else None
        return raw == fg_value, ignore

    def fingerprint(self) -> str:
        if self._fingerprint is not None:
            return self._fingerprint
        images = [self.image_path(i) for i in self.ids]
        masks = [self.mask_path(i) for i in self.ids]
        mode = f"value={self.mask_value}|threshold={self.threshold}|suffix={self.mask_suffix}"
        try:
            extra = f"folders|{'|'.join(self.class_names)}|{mode}"
            self._fingerprint = files_fingerprint(images, extra=extra, hashed=masks)
            return self._fingerprint
        except FileNotFoundError as e:
            raise DataError(f"file listed under {self.root} is missing: {e.filename}") from None
