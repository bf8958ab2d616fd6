"""Reuse of frozen backbone features across episodes.

The backbone is frozen, and an image recurs in many episodes (1,000 one-shot episodes of a PASCAL fold
touch only 336-592 distinct images), so each image is encoded once per run. Every image is always encoded
alone (batch of one), cached or not, which keeps the cached and uncached paths bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from dedn.errors import DataError
from dedn.utils.io import cache_dir, hash_file
from dedn.utils.machine import machine_info

Features = dict[str, Tensor]


class FeatureCache:
    """Least-recently-used cache of per-image features, bounded in bytes."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Features] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(feats: Features) -> int:
        return sum(t.numel() * t.element_size() for t in feats.values())

    def get(self, key: str, compute: Callable[[], Features]) -> Features:
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        feats = compute()
        size = self._size(feats)
        if size <= self.max_bytes:
            self._items[key] = feats
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= self._size(old)
        return feats

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


class ImageEncoder:
    """Features (C, h, w) of one image, encoded alone (batch of one) and cached when a cache is given.

    ``load`` is called only on a cache miss, so a cached image is not even decoded again.
    """

    def __init__(self, model, device: torch.device, cache: FeatureCache | None = None):
        self.model = model
        self.device = device
        self.cache = cache

    def _encode(self, load: Callable[[], Tensor]) -> Features:
        feats = self.model.encode(load().unsqueeze(0).to(self.device))
        return {k: v[0] for k, v in feats.items()}

    def __call__(self, key: str, load: Callable[[], Tensor]) -> Features:
        if self.cache is None:
            return self._encode(load)
        return self.cache.get(key, lambda: self._encode(load))


class FeatureStore:
    """Frozen features of every image of a source, kept on disk and shared by runs and processes.

    One float32 ``<name>.npy`` per feature (N, C, h, w), memory-mapped, and ``index.json`` (image id ->
    row). Every image is encoded alone (batch of one), exactly as :class:`ImageEncoder` does, so results
    are bit-identical to encoding on the fly. The operating system's page cache holds one copy in memory
    however many processes read the store: a table of many training and evaluation runs encodes each
    image once, instead of once per run. Build it with :func:`build_feature_store` (``dedn features``).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.key = index["key"]
        self.rows = {image_id: i for i, image_id in enumerate(index["ids"])}
        self.arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in index["names"]}
        #: features not stored but computed from a stored one on reading: {name: {"from": stored name,
        #: "normalize": channels of each level}} (``high`` is ``mid`` with each level L2-normalised when
        #: the model reads the same levels as both, as the offline defaults do: half the bytes)
        self.derived: dict[str, dict] = index.get("derived", {})
        self.dtype = index.get("dtype", "float32")
        self.hits = 0
        self.misses = 0

    @property
    def bytes_per_image(self) -> int:
        """Bytes on disk per image (all stored arrays)."""
        return sum(a[0].nbytes for a in self.arrays.values()) if self.rows else 0

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def features(self, image_id: str) -> Features:
        row = self.rows[image_id]
        feats = {
            name: torch.from_numpy(np.array(a[row], dtype=np.float32)) for name, a in self.arrays.items()
        }
        for name, rule in self.derived.items():
            feats[name] = normalize_levels(feats[rule["from"]].unsqueeze(0), rule["normalize"])[0]
        return dict(sorted(feats.items()))

    def get(self, key: str, compute: Callable[[], Features]) -> Features:
        """The :class:`FeatureCache` interface: stored features, or ``compute()`` for an unknown id."""
        if key in self.rows:
            self.hits += 1
            return self.features(key)
        self.misses += 1
        return compute()


def normalize_levels(x: Tensor, channels: list[int]) -> Tensor:
    """(N, sum(channels), h, w) -> the same with each level's channels L2-normalised, exactly as
    ``FewShotSegmenter.encode`` makes ``high`` (bit-identical: the same operation on the same numbers)."""
    return torch.cat([F.normalize(part, dim=1) for part in x.split(list(channels), dim=1)], dim=1)


#: how a store keeps its numbers: float32 (exact) or float16 (half the bytes; mIoU within 0.1 on the
#: offline PASCAL-5i table, docs/results.md)
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


def derived_features(model) -> dict[str, dict]:
    """The features a store need not keep for ``model``: ``high`` when it reads the same levels as
    ``mid`` (``high`` is then ``mid`` with each level normalised)."""
    if list(model.high_levels) != list(model.mid_levels):
        return {}
    info = model.backbone.feature_info
    return {"high": {"from": "mid", "normalize": [info[n].channels for n in model.mid_levels]}}


def feature_store_key(
    source, model_cfg, image_size: int, mid_levels, high_levels, dtype: str = "float32"
) -> str:
    """What the stored features depend on: the images, the backbone and its weights, the input size, and
    how they are kept (number type, features derived on reading)."""
    weights = model_cfg.weights
    if weights not in (None, "imagenet") and Path(weights).is_file():
        # by content, like the data's fingerprint: a moved or re-copied weight file keeps its store
        weights = f"sha1:{hash_file(weights).hexdigest()}"
    described = {
        "format": 1,
        "source": f"{source.name}-{source.fingerprint()}",
        "backbone": model_cfg.backbone,
        "weights": weights,
        "dilate": model_cfg.dilate,
        "mid": list(mid_levels),
        "high": list(high_levels),
        "image_size": image_size,
        "torch": torch.__version__,
    }
    if dtype != "float32":
        # float32 stores keep their key whatever their layout (a derived feature reads back bit-identical)
        described.update(format=2, dtype=dtype)
    blob = json.dumps(described, sort_keys=True).encode()
    return f"{source.name}-{model_cfg.backbone}-{image_size}-{hashlib.sha256(blob).hexdigest()[:16]}"


def build_feature_store(
    model,
    source,
    image_size: int,
    device: torch.device,
    root: str | Path | None = None,
    progress: bool = True,
    dtype: str = "float32",
) -> FeatureStore:
    """Open the store of ``source`` under ``root`` (default ``cache_dir()/features``), encoding every
    image first if it does not exist yet. Written to a temporary folder and renamed into place, so an
    interrupted build leaves nothing half-written behind, and two processes building at once cannot mix.

    ``dtype``: float32 (reading gives exactly the features encoded on the fly) or float16 (half the bytes).
    A feature that can be computed from another on reading (:func:`derived_features`) is not stored."""
    from dedn.data.transforms import TestTransform

    if dtype not in STORE_DTYPES:
        raise DataError(f"feature store dtype {dtype!r}; expected one of: {', '.join(STORE_DTYPES)}")
    root = Path(root) if root else cache_dir() / "features"
    derived = derived_features(model)
    key = feature_store_key(source, model.cfg, image_size, model.mid_levels, model.high_levels, dtype)
    folder = root / key
    if (folder / "index.json").is_file():
        return FeatureStore(folder)
    ids = list(source.ids)
    if not ids:
        raise DataError(f"{source.name}: no images to encode")
    transform = TestTransform(image_size)
    encoder = ImageEncoder(model, device)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        arrays: dict[str, np.ndarray] = {}
        for i, image_id in enumerate(tqdm(ids, desc="encoding images", disable=not progress, leave=False)):
            feats = encoder(image_id, lambda image_id=image_id: transform(source.load_image(image_id))[0])
            feats = {name: t for name, t in feats.items() if name not in derived}
            if not arrays:
                for name, t in feats.items():
                    arrays[name] = np.lib.format.open_memmap(
                        tmp / f"{name}.npy", mode="w+", dtype=STORE_DTYPES[dtype], shape=(len(ids), *t.shape)
                    )
            for name, t in feats.items():
                arrays[name][i] = t.cpu().numpy()
        for a in arrays.values():
            a.flush()
        del arrays
        # the CPU's thread count and instruction set change the features in their last bits (about 1e-5),
        # and a training on them can then end a point of mIoU apart: recorded so that a result can name
        # the store it used
        threads = torch.get_num_threads() if device.type == "cpu" else None
        index = {
            "key": key,
            "ids": ids,
            "names": sorted(feats),
            "derived": derived,
            "dtype": dtype,
            "image_size": image_size,
            "threads": threads,
            "machine": machine_info(device),
        }
        (tmp / "index.json").write_text(json.dumps(index))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "index.json").is_file():  # not "another process finished first"
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return FeatureStore(folder)


def open_feature_store(cfg, model, source, device: torch.device, dist_info=None, progress: bool = True):
    """The store that ``cfg.feature_store`` asks for (None when it is off). Under torchrun the main
    process builds it while the others wait."""
    from dedn.engine.distributed import DistInfo, barrier

    if not cfg.feature_store:
        return None
    info = dist_info or DistInfo()
    root = None if cfg.feature_store == "auto" else cfg.feature_store
    size, dtype = cfg.data.image_size, cfg.feature_store_dtype
    if info.is_main:
        store = build_feature_store(model, source, size, device, root, progress, dtype)
    barrier(info)
    if not info.is_main:
        store = build_feature_store(model, source, size, device, root, progress=False, dtype=dtype)
    return store


def store_bytes_per_image(model, image_size: int, dtype: str = "float32") -> int:
    """Bytes one image takes in a store of ``model``'s features (from one encoding of a blank image)."""
    with torch.no_grad():
        feats = model.encode(torch.zeros(1, 3, image_size, image_size, device=next(model.buffers()).device))
    derived = derived_features(model)
    itemsize = np.dtype(STORE_DTYPES[dtype]).itemsize
    return sum(t[0].numel() * itemsize for name, t in feats.items() if name not in derived)
