"""The one interface every data reader implements.

A *source* is a set of images with dense labels in a global class space: ``0`` background,
``1..num_classes`` object classes, ``255`` ignore. Readers differ only in how they find and decode files;
everything protocol-related (folds, eligibility, episodes) works on this interface alone.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dedn.errors import DataError
from dedn.utils.io import hash_file

IGNORE_INDEX = 255


class SegmentationSource(ABC):
    """Images with labels ``0`` (background), ``1..num_classes`` and ``255`` (ignore)."""

    #: short name used in caches and results ("pascal", "coco", "folders", "synthetic")
    name: str = "source"

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    @abstractmethod
    def ids(self) -> list[str]:
        """Image ids, in a fixed order."""

    @abstractmethod
    def describe(self, image_id: str) -> str:
        """Where the image comes from (a file path, or a generator seed), for error messages."""

    @abstractmethod
    def _read_image(self, image_id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""

    @abstractmethod
    def _read_label(self, image_id: str) -> np.ndarray:
        """(H, W) uint8 label in the global class space."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the content may have changed (used as a cache key)."""

    def load_image(self, image_id: str) -> np.ndarray:
        return self._read_image(image_id)

    def load_label(self, image_id: str) -> np.ndarray:
        label = self._read_label(image_id)
        self._check_values(image_id, label)
        return label

    def image_hw(self, image_id: str) -> tuple[int, int]:
        """(H, W) of the image as :meth:`load_image` returns it; from the file's header where the source
        has image files (no decoding), else by loading the image."""
        image_path = getattr(self, "image_path", None)
        if image_path is not None:
            path = image_path(image_id)
            try:
                with Image.open(path) as im:
                    return im.height, im.width
            except FileNotFoundError:
                raise DataError(f"image file not found: {path}") from None
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"cannot read image {path}: {e}") from None
        return tuple(self.load_image(image_id).shape[:2])

    def check_same_size(self, image_id: str, image_hw: tuple[int, int], label_hw: tuple[int, int]) -> None:
        """DataError naming the image if its mask is not of the image's size (the prediction, made on the
        image, would be scored against a mask of other pixels)."""
        if tuple(image_hw[:2]) != tuple(label_hw[:2]):
            raise DataError(
                f"{self.describe(image_id)}: mask is {label_hw[1]}x{label_hw[0]} (WxH) but the image "
                f"is {image_hw[1]}x{image_hw[0]}; image and mask must have the same size"
            )

    def load_pair(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Image (H, W, 3) uint8 and label (H, W) uint8, checked to have the same size."""
        image = self.load_image(image_id)
        label = self.load_label(image_id)
        self.check_same_size(image_id, image.shape, label.shape)
        return image, label

    def _check_values(self, image_id: str, label: np.ndarray) -> None:
        values = np.unique(label)
        bad = [int(v) for v in values if not (v <= self.num_classes or v == IGNORE_INDEX)]
        if bad:
            raise DataError(
                f"{self.describe(image_id)}: mask has values {bad[:10]}; expected 0 (background), "
                f"1..{self.num_classes} (classes) or {IGNORE_INDEX} (ignore)"
            )

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes)"


def files_fingerprint(paths: Sequence[Path], extra: str = "", hashed: Sequence[Path] = ()) -> str:
    """A hash that changes when the data changes, and only then.

    ``paths`` enter by ``<folder name>/<file name>`` and byte size; the files in ``hashed`` (the labels,
    which decide the class index and every episode, and are small) also by their bytes. Neither full
    paths nor modification times enter: the same data reached from another checkout, through a relative
    path, or copied without its timestamps (a fresh download, ``cp`` without ``-p``, a container mount)
    keeps its fingerprint, and so its episode files and feature store. An in-place edit of an image that
    keeps its byte size is not seen; delete the cache after one (``dedn features`` rebuilds it)."""
    h = hashlib.sha1(extra.encode())
    for p in paths:
        h.update(f"{p.parent.name}/{p.name}|{p.stat().st_size}\n".encode())
    for p in hashed:
        h.update(f"{p.parent.name}/{p.name}|".encode())
        hash_file(p, h)
    return h.hexdigest()[:16]
