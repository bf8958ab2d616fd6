"""COCO instance-annotation reader (2014 or 2017 layout) producing dense class labels.

Layout::

    root/<split>/<file_name>                       e.g. root/val2017/000000000139.jpg
    root/annotations/instances_<split>.json        the official instance format

Category ids (1..90 with gaps) are mapped to ``1..N`` in increasing id order (``1..80`` for COCO, names in
:data:`dedn.data.folds.COCO_CLASSES`). Masks are rasterised with pycocotools from polygons, uncompressed
RLE or compressed RLE.

Overlap rule (documented because the instance masks of one image may overlap): crowd regions are painted
first as ``255`` (ignore); then the non-crowd instances in increasing annotation-id order, each
overwriting what is under it. So among objects the later annotation wins, and an object pixel is never
turned into ignore by a crowd region - crowd only ever marks pixels that no object claims. The rule does
not depend on the order of the json lists.

Image ids are the file-name stems (``000000000139``), in increasing COCO image-id order.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from dedn.data.base import IGNORE_INDEX, SegmentationSource, files_fingerprint
from dedn.data.voc import read_rgb
from dedn.errors import DataError

# bump when the rasterisation rule changes, so cached class indices are rebuilt
_RULE_VERSION = "crowd-first-objects-by-ann-id-v1"


class COCOSource(SegmentationSource):
    """COCO images with dense labels rasterised from the instance annotations (crowd -> 255)."""

    name = "coco"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val2017",
        annotation_file: str | os.PathLike | None = None,
        image_dir: str | os.PathLike | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"COCO root {self.root} does not exist or is not a folder")
        self.split = split
        self.annotation_file = (
            Path(annotation_file)
            if annotation_file is not None
            else self.root / "annotations" / f"instances_{split}.json"
        )
        self.image_dir = Path(image_dir) if image_dir is not None else self.root / split
        if not self.annotation_file.is_file():
            raise DataError(f"COCO annotation file {self.annotation_file} not found")
        if not self.image_dir.is_dir():
            raise DataError(f"COCO image folder {self.image_dir} not found")
        data = self._load_json()
        categories = sorted(data.get("categories", []), key=lambda c: c["id"])
        if not categories:
            raise DataError(f"{self.annotation_file}: no categories; expected the COCO instance format")
        self._fingerprint: str | None = None  # computed once: it reads the annotation file
        super().__init__([c["name"] for c in categories])
        #: original COCO category id -> class index 1..N
        self.category_to_class = {c["id"]: i + 1 for i, c in enumerate(categories)}
        self._images: dict[str, dict[str, Any]] = {}
        self._anns: dict[int, list[dict[str, Any]]] = {}
        for img in sorted(data.get("images", []), key=lambda r: r["id"]):
            image_id = Path(img["file_name"]).stem
            if image_id in self._images:
                raise DataError(f"{self.annotation_file}: two images share the file name stem {image_id!r}")
            self._images[image_id] = img
            self._anns[img["id"]] = []
        for ann in data.get("annotations", []):
            if ann["image_id"] not in self._anns:
                raise DataError(
                    f"{self.annotation_file}: annotation {ann.get('id')} refers to image id "
                    f"{ann['image_id']}, which is not in the image list"
                )
            if ann["category_id"] not in self.category_to_class:
                raise DataError(
                    f"{self.annotation_file}: annotation {ann.get('id')} has category id "
                    f"{ann['category_id']}, which is not among the {len(categories)} categories"
                )
            self._anns[ann["image_id"]].append(ann)
        for anns in self._anns.values():
            anns.sort(key=lambda a: a.get("id", 0))
        self._ids = list(self._images)

    def _load_json(self) -> dict[str, Any]:
        try:
            with open(self.annotation_file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read COCO annotations {self.annotation_file}: {e}") from None
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise DataError(
                f"{self.annotation_file}: expected the COCO instance format with 'images', 'annotations' "
                "and 'categories'"
            )
        return data

    @property
    def ids(self) -> list[str]:
        return self._ids

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / self._record(image_id)["file_name"]

    def _record(self, image_id: str) -> dict[str, Any]:
        try:
            return self._images[image_id]
        except KeyError:
            raise DataError(f"image id {image_id!r} is not in {self.annotation_file}") from None

    def describe(self, image_id: str) -> str:
        return f"{self.image_path(image_id)} (annotations {self.annotation_file})"

    def _read_image(self, image_id: str) -> np.ndarray:
        return read_rgb(self.image_path(image_id))

    def annotations(self, image_id: str) -> list[dict[str, Any]]:
        """The raw instance annotations of one image, in annotation-id order."""
        return list(self._anns[self._record(image_id)["id"]])

    def _read_label(self, image_id: str) -> np.ndarray:
        rec = self._record(image_id)
        h, w = int(rec["height"]), int(rec["width"])
        label = np.zeros((h, w), dtype=np.uint8)
        anns = self._anns[rec["id"]]
        # crowd first, so that objects painted afterwards win over it; objects in annotation-id order
        ordered = [a for a in anns if a.get("iscrowd", 0)] + [a for a in anns if not a.get("iscrowd", 0)]
        rles = [self._rle(a, h, w) for a in ordered]
        kept = [(a, r) for a, r in zip(ordered, rles, strict=True) if r is not None]
        if not kept:
            return label
        with warnings.catch_warnings():
            # pycocotools (<= 2.0.8) trips numpy 2's copy-keyword deprecation inside decode
            warnings.simplefilter("ignore", DeprecationWarning)
            masks = mask_utils.decode([r for _, r in kept])  # (h, w, N) uint8
        for k, (ann, _) in enumerate(kept):
            value = IGNORE_INDEX if ann.get("iscrowd", 0) else self.category_to_class[ann["category_id"]]
            label[masks[:, :, k] > 0] = value
        return label

    def _rle(self, ann: dict[str, Any], h: int, w: int) -> dict[str, Any] | None:
        """The annotation as one compressed RLE (None for an empty polygon list)."""
        segm = ann.get("segmentation")
        where = f"{self.annotation_file}: annotation {ann.get('id')} (image id {ann['image_id']})"
        try:
            if isinstance(segm, list):
                # polygons with fewer than 3 points are degenerate (and pycocotools would read a 4-number
                # polygon as a box), so they are skipped
                polygons = [p for p in segm if len(p) >= 6]
                if not polygons:
                    return None
                return mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
            if isinstance(segm, dict) and "counts" in segm and "size" in segm:
                if [int(s) for s in segm["size"]] != [h, w]:
                    raise DataError(
                        f"{where}: RLE size {segm['size']} differs from the image size [{h}, {w}] (HxW)"
                    )
                if isinstance(segm["counts"], list):
                    return mask_utils.frPyObjects(segm, h, w)
                counts = segm["counts"]
                return {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
            raise DataError(f"{where}: segmentation must be a polygon list or an RLE dict")
        except DataError:
            raise
        except (TypeError, ValueError, KeyError, IndexError) as e:
            raise DataError(f"{where}: cannot rasterise the segmentation: {e}") from None

    def fingerprint(self) -> str:
        # the labels and the image list come from the json: its bytes; the images: their names and sizes
        if self._fingerprint is None:
            extra = f"coco|{self.split}|{_RULE_VERSION}"
            images = [self.image_path(i) for i in self._ids]
            try:
                self._fingerprint = files_fingerprint(images, extra=extra, hashed=[self.annotation_file])
            except FileNotFoundError as e:
                raise DataError(f"image listed in {self.annotation_file} is missing: {e.filename}") from None
        return self._fingerprint
