"""Label-map reader: images, index label maps and a class list, the layout of most semantic-segmentation
data sets (CamVid, ADE20K-style sets, Cityscapes trainIds).

Layout::

    root/images/<id>.jpg        (or .jpeg / .png / .bmp / .tif / .tiff / .webp)
    root/labels/<id>.png        index PNG (palette or grayscale, 8 or 16 bit): one class value per pixel
    root/classes.txt            one class name per line, in the order of their label values
    root/<split>.txt            optional id lists (``test.txt``, ``val.txt``); no split: every label

Label values: the class on line ``i`` (1-based) of ``classes.txt`` has value ``first_class_value + i - 1``
(``first_class_value`` 1 for CamVid and ADE20K, whose 0 is "void / other"; 0 for Cityscapes trainIds).
The values in ``void`` (e.g. ``[0]`` for CamVid, ``[255]`` for Cityscapes) become the ignore label 255;
any other value is an error naming the file. Classes become the global ids ``1..N`` in file order: in an
episode of class ``c`` every other class is background. The values in ``background`` (e.g. ``[0]`` for
the Clothing Co-Parsing set, whose 0 is the photo's background, or for binary medical and aerial masks)
become the global label 0: background in every episode, neither a class nor void.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dedn.data.base import IGNORE_INDEX, SegmentationSource, files_fingerprint
from dedn.data.voc import find_list_file, read_list_file, read_mask, read_rgb
from dedn.errors import DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: marks label values that are neither a class nor void in the lookup table
_INVALID = -1


def read_class_list(path: Path) -> list[str]:
    """Class names, one per non-empty line (``#`` starts a comment line); duplicates are an error."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read class list {path}: {e.strerror or e}") from None
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise DataError(f"class list {path} names no class; expected one class name per line")
    seen: set[str] = set()
    for n, name in enumerate(names, 1):
        if name in seen:
            raise DataError(f"class list {path}: class {name!r} is listed twice (entry {n})")
        seen.add(name)
    return names


class LabelMapSource(SegmentationSource):
    """Images with index label maps and a class list (see the module docstring for the layout)."""

    name = "labelmap"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | os.PathLike | None = None,
        void: Sequence[int] = (0,),
        first_class_value: int = 1,
        image_dir: str = "images",
        label_dir: str = "labels",
        classes_file: str = "classes.txt",
        background: Sequence[int] = (),
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"label-map root {self.root} does not exist or is not a folder")
        self.image_dir = self.root / image_dir
        self.label_dir = self.root / label_dir
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                raise DataError(
                    f"label-map folder {folder} is missing; expected {image_dir}/ and {label_dir}/ in "
                    f"{self.root}"
                )
        self.classes_path = self.root / classes_file
        if not self.classes_path.is_file():
            raise DataError(f"class list {self.classes_path} not found; expected one class name per line")
        names = read_class_list(self.classes_path)
        if len(names) >= IGNORE_INDEX:
            raise DataError(
                f"class list {self.classes_path} has {len(names)} classes; the label-map reader takes at "
                f"most {IGNORE_INDEX - 1}"
            )
        super().__init__(names)
        self.void = sorted({int(v) for v in void})
        self.background = sorted({int(v) for v in background})
        self.first_class_value = int(first_class_value)
        if self.first_class_value < 0:
            raise DataError(f"first_class_value = {first_class_value}; expected a label value >= 0")
        negative = [v for v in [*self.void, *self.background] if v < 0]
        if negative:
            raise DataError(f"void/background label value(s) {negative} are negative; label values are >= 0")
        class_values = range(self.first_class_value, self.first_class_value + len(names))
        for what, values in (("void", self.void), ("background", self.background)):
            clash = sorted(set(values) & set(class_values))
            if clash:
                raise DataError(
                    f"{what} label value(s) {clash} are also class values ({self.first_class_value}.."
                    f"{class_values[-1]} for the {len(names)} classes of {self.classes_path})"
                )
        both = sorted(set(self.void) & set(self.background))
        if both:
            raise DataError(f"label value(s) {both} are listed as both void and background; choose one")
        self._lut = self._lookup_table(max([*self.void, *self.background, class_values[-1]]) + 1)
        self.list_file: Path | None = None
        labels = {p.stem for p in self.label_dir.glob("*.png")}
        if split is None:
            self._ids = sorted(labels)
            if not self._ids:
                raise DataError(f"no label PNGs found in {self.label_dir}")
        else:
            self.list_file = find_list_file(split, [self.root])
            self._ids = read_list_file(self.list_file)
            missing = [i for i in self._ids if i not in labels]
            if missing:
                raise DataError(
                    f"{len(missing)} id(s) of {self.list_file} have no label in {self.label_dir}, "
                    f"e.g. {missing[0]!r}"
                )
        images: dict[str, Path] = {}
        for entry in os.scandir(self.image_dir):
            stem, ext = os.path.splitext(entry.name)
            if ext.lower() in IMAGE_EXTS and entry.is_file():
                images.setdefault(stem, Path(entry.path))
        missing = [i for i in self._ids if i not in images]
        if missing:
            raise DataError(
                f"{len(missing)} labelled id(s) have no image in {self.image_dir} (looked for "
                f"{'/'.join(IMAGE_EXTS)}), e.g. {missing[0]!r}"
            )
        self._images = {i: images[i] for i in self._ids}
        self._fingerprint: str | None = None

    def _lookup_table(self, size: int) -> np.ndarray:
        """Raw value -> global label (1..N, 255 for void, 0 for background, _INVALID otherwise)."""
        lut = np.full(max(size, 256), _INVALID, dtype=np.int32)
        lut[self.void] = IGNORE_INDEX
        lut[self.background] = 0
        lut[self.first_class_value : self.first_class_value + self.num_classes] = np.arange(
            1, self.num_classes + 1
        )
        return lut

    @property
    def ids(self) -> list[str]:
        return self._ids

    def image_path(self, image_id: str) -> Path:
        try:
            return self._images[image_id]
        except KeyError:
            raise DataError(f"image id {image_id!r} is not in the label-map set {self.root}") from None

    def label_path(self, image_id: str) -> Path:
        return self.label_dir / f"{image_id}.png"

    def describe(self, image_id: str) -> str:
        return f"{self.image_path(image_id)} (label {self.label_path(image_id)})"

    def _read_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.image_path(image_id))

    def _read_label(self, image_id: str) -> np.ndarray:
        path = self.label_path(image_id)
        raw = read_mask(path)
        if raw.size and (raw.min() < 0 or raw.max() >= len(self._lut)):
            bad = int(raw.max()) if raw.max() >= len(self._lut) else int(raw.min())
            raise DataError(f"label {path} has value {bad}; {self._expected()}")
        label = self._lut[raw]
        if (label == _INVALID).any():
            bad = np.unique(raw[label == _INVALID])[:10].tolist()
            raise DataError(f"label {path} has values {bad}; {self._expected()}")
        return label.astype(np.uint8)

    def _expected(self) -> str:
        last = self.first_class_value + self.num_classes - 1
        return (
            f"expected {self.first_class_value}..{last} (the {self.num_classes} classes of "
            f"{self.classes_path.name}), void {self.void} or background {self.background}"
        )

    def fingerprint(self) -> str:
        if self._fingerprint is not None:
            return self._fingerprint
        images = [self.image_path(i) for i in self._ids]
        labels = [self.label_path(i) for i in self._ids]
        extra = f"labelmap|{'|'.join(self.class_names)}|void={self.void}|first={self.first_class_value}"
        if self.background:  # fingerprints of sets without a background value are those of before
            extra += f"|background={self.background}"
        try:
            self._fingerprint = files_fingerprint(images, extra=extra, hashed=labels)
        except FileNotFoundError as e:
            raise DataError(f"file of the label-map set {self.root} is missing: {e.filename}") from None
        return self._fingerprint
