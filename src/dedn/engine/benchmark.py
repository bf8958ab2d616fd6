"""From a data config to the sources and the fold split that training and evaluation use."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from dedn.config import DataConfig
from dedn.data.base import SegmentationSource
from dedn.data.episodes import episode_meta
from dedn.data.folds import base_classes, novel_classes
from dedn.data.index import class_pixel_counts
from dedn.data.protocol import (
    FewShotSplit,
    all_classes_split,
    cross_domain_split,
    disjoint_split,
    hold_out_classes,
    pairs_by_class,
    read_pair_list,
    standard_split,
)
from dedn.errors import ConfigError, DataError

__all__ = ["Benchmark", "build_benchmark", "build_source", "pairs_by_class"]


@dataclass
class Benchmark:
    name: str
    fold: int
    train_source: SegmentationSource
    test_source: SegmentationSource
    split: FewShotSplit
    convention: str
    #: sha256 (first 16 hex digits) of the data.pair_list file whose pairs are the test pairs, or None
    pair_list: str | None = None

    def episode_meta(self, shots: int, seed: int, n: int) -> dict:
        """What an episode file must agree on to be reused for a run."""
        extra = {"pair_list": self.pair_list} if self.pair_list else {}
        return episode_meta(
            self.name,
            self.fold,
            shots,
            seed,
            n,
            self.test_source.fingerprint(),
            convention=self.convention,
            protocol=self.split.protocol,
            **extra,
        )


def _require_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise ConfigError(f"data.root is required for data.benchmark = {cfg.benchmark}")
    return Path(cfg.root)


def build_source(cfg: DataConfig, split: str | None) -> SegmentationSource:
    """The reader for ``cfg.benchmark``; ``split`` picks a list file / COCO split where there is one."""
    if cfg.benchmark == "synthetic":
        from dedn.data.synthetic import SyntheticSource

        s = cfg.synthetic
        return SyntheticSource(s.seed, s.num_classes, s.images_per_class, s.image_size)
    root = _require_root(cfg)
    if cfg.benchmark == "pascal":
        from dedn.data.voc import VOCSource

        return VOCSource(root, split=split or "val")
    if cfg.benchmark == "coco":
        from dedn.data.coco import COCOSource

        return COCOSource(root, split=split or "val2014")
    if cfg.benchmark == "labelmap":
        from dedn.data.labelmap import LabelMapSource

        lm = cfg.labelmap
        return LabelMapSource(
            root,
            split=split,
            void=lm.void,
            first_class_value=lm.first_class_value,
            image_dir=lm.image_dir,
            label_dir=lm.label_dir,
            classes_file=lm.classes_file,
            background=lm.background,
        )
    from dedn.data.folders import ClassFolderSource

    return ClassFolderSource(root)


def build_benchmark(cfg: DataConfig, progress: bool = False) -> Benchmark:
    """Sources, fold classes and pairs for ``cfg`` (label scans are cached, see dedn.data.index)."""
    test_source = build_source(cfg, cfg.test_split)
    min_pixels = cfg.min_pixels
    if cfg.benchmark == "synthetic":
        # small synthetic images cannot hold 2,048-pixel objects; the source states its own threshold
        min_pixels = min(min_pixels, test_source.min_pixels)
    convention = cfg.coco_convention if cfg.benchmark == "coco" else "consecutive"
    if cfg.benchmark == "labelmap" and cfg.protocol not in ("cross", "all"):
        raise ConfigError(
            "data.benchmark = labelmap has no fold table; use data.protocol = cross (every class novel, "
            f"test episodes only) or all (every class trained on), not {cfg.protocol!r}"
        )
    if cfg.protocol == "all":
        if cfg.fold != 0 or cfg.val_classes is not None or cfg.pair_list is not None:
            raise ConfigError(
                "data.protocol = all has no fold (data.fold must be 0) and no test or held-out classes "
                "(data.val_classes, data.pair_list)"
            )
        counts = class_pixel_counts(test_source, progress=progress)
        classes = list(range(1, test_source.num_classes + 1))
        split = all_classes_split(counts, classes, cfg.val_fraction, seed=0, min_pixels=min_pixels)
        return Benchmark(cfg.benchmark, cfg.fold, test_source, test_source, split, convention)
    if cfg.pair_list is not None and cfg.val_classes is not None:
        raise ConfigError("data.pair_list and data.val_classes cannot be combined")
    if cfg.protocol == "cross":
        if cfg.fold != 0:
            raise ConfigError(f"data.protocol = cross has a single fold (0); got data.fold = {cfg.fold}")
        if cfg.val_classes is not None:
            raise ConfigError("data.protocol = cross has no training classes to hold out (data.val_classes)")
        test_counts = class_pixel_counts(test_source, progress=progress)
        classes = list(range(1, test_source.num_classes + 1))
        # with a minimum set, a class must also give a query and `shots` other images to form an episode
        least = max(cfg.min_class_images, cfg.shots + 1) if cfg.min_class_images else 0
        split = cross_domain_split(test_counts, classes, min_pixels, least)
        bench = Benchmark(cfg.benchmark, cfg.fold, test_source, test_source, split, convention)
        return _with_pair_list(bench, cfg, test_counts)
    if cfg.benchmark == "folders":
        # a user's own class folders: every class is novel, there is nothing to train on
        novel, base = list(range(1, test_source.num_classes + 1)), []
    else:
        names = test_source.class_names
        novel = novel_classes(cfg.benchmark, cfg.fold, convention, class_names=names)
        base = base_classes(cfg.benchmark, cfg.fold, convention, class_names=names)
    test_counts = class_pixel_counts(test_source, progress=progress)
    if cfg.protocol == "disjoint":
        train_source, train_counts = test_source, test_counts
        split = disjoint_split(test_counts, novel, base, cfg.val_fraction, seed=0, min_pixels=min_pixels)
    else:
        if cfg.train_split is None:
            raise ConfigError("data.protocol = standard needs data.train_split (and data.test_split)")
        train_source = build_source(cfg, cfg.train_split)
        train_counts = class_pixel_counts(train_source, progress=progress)
        split = standard_split(
            train_counts,
            test_counts,
            novel,
            base,
            cfg.novel_in_train,
            cfg.val_fraction,
            seed=0,
            min_pixels=min_pixels,
        )
    if cfg.val_classes is not None:
        try:
            split = hold_out_classes(split, train_counts, cfg.val_classes, min_pixels)
        except DataError as e:
            raise ConfigError(f"data.val_classes = {cfg.val_classes} (fold {cfg.fold}): {e}") from None
    bench = Benchmark(cfg.benchmark, cfg.fold, train_source, test_source, split, convention)
    return _with_pair_list(bench, cfg, test_counts)


def _with_pair_list(bench: Benchmark, cfg: DataConfig, test_counts) -> Benchmark:
    """``bench`` with the test pairs of ``cfg.pair_list`` (HSNet's list format), if one is given."""
    if cfg.pair_list is None:
        return bench
    pairs = read_pair_list(cfg.pair_list, test_counts, bench.split.novel)
    digest = hashlib.sha256(Path(cfg.pair_list).read_bytes()).hexdigest()[:16]
    return dataclasses.replace(
        bench, split=dataclasses.replace(bench.split, test_pairs=pairs), pair_list=digest
    )
