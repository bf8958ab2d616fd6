"""Episodic training of DEDN and its trainable baselines.

Episode ``i`` of a run is a pure function of ``(train.seed, i)``: the batch of step ``t`` is episodes
``t*B .. t*B+B-1`` whatever the number of processes or data-loader workers, and ``--resume`` continues
exactly where a run stopped (model, optimizer, schedule and the dropout RNG are all in the checkpoint).
Validation uses held-out training images of base classes only; the test episodes are never touched here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from dedn.config import Config, PseudoClassConfig, dump_config, to_dict
from dedn.data.episodes import TrainEpisodeDataset, binarize, sample_test_episodes, train_episode
from dedn.data.index import ignore_value
from dedn.data.pseudo_classes import fit_part_classes, fit_pseudo_classes
from dedn.data.transforms import TestTransform, TrainTransform
from dedn.engine.benchmark import Benchmark, build_benchmark, pairs_by_class
from dedn.engine.checkpoint import (
    check_compatible,
    checkpoint_config,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    trainable_state,
)
from dedn.engine.distributed import DistInfo, barrier
from dedn.engine.evaluate import evaluate_episodes
from dedn.engine.features import FeatureCache, FeatureStore, open_feature_store
from dedn.errors import ConfigError, DataError
from dedn.losses import dedn_loss
from dedn.models.network import FewShotSegmenter
from dedn.utils.io import atomic_write_json, atomic_write_text, make_dir
from dedn.utils.machine import machine_info


class StepSampler(torch.utils.data.Sampler):
    """Yields this process's episode indices for steps ``start..end-1`` (a batch each)."""

    def __init__(self, start: int, end: int, batch: int, dist_info: DistInfo):
        if batch % dist_info.world_size:
            raise ConfigError(
                f"train.batch_size = {batch} is not divisible by the {dist_info.world_size} processes"
            )
        self.start, self.end, self.batch, self.info = start, end, batch, dist_info

    def __iter__(self):
        per = self.batch // self.info.world_size
        for step in range(self.start, self.end):
            base = step * self.batch + self.info.rank * per
            yield list(range(base, base + per))

    def __len__(self) -> int:
        return self.end - self.start


class FeatureEpisodes:
    """Training episodes on cached frozen features: every training image is encoded once at the test
    resolution, and augmentation is a random horizontal flip in feature space. Much cheaper on a CPU,
    at the cost of scale/rotation augmentation (see docs/method.md)."""

    def __init__(
        self,
        model: FewShotSegmenter,
        source,
        by_class,
        shots: int,
        size: int,
        flip: float,
        seed: int,
        device: torch.device,
        progress: bool,
        store: FeatureStore | None = None,
        negative: float = 0.0,
        pseudo: PseudoClassConfig | None = None,
        num_classes: int = 0,
        min_pixels: int = 2048,
    ):
        self.by_class, self.shots, self.flip, self.seed, self.size = by_class, shots, flip, seed, size
        self.negative = negative
        transform = TestTransform(size)
        ids = sorted({i for pairs in by_class.values() for i in pairs})
        self.store = store
        self.features: dict[str, dict[str, torch.Tensor]] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self.ignore = ignore_value(source)
        desc = "reading training labels" if store else "encoding training images"
        for image_id in tqdm(ids, desc=desc, disable=not progress, leave=False):
            if store is not None and image_id in store:
                # features are read from the store when a batch needs them
                label = source.load_label(image_id)
                source.check_same_size(image_id, source.image_hw(image_id), label.shape)
                _, lab, _ = transform(None, label)
            else:
                image, label = source.load_pair(image_id)
                img, lab, _ = transform(image, label)
                feats = model.encode(img.unsqueeze(0).to(device))
                self.features[image_id] = {k: v[0] for k, v in feats.items()}
            self.labels[image_id] = lab  # (S, S) int64, padding 255
        self.pseudo_fraction = pseudo.fraction if pseudo is not None else 0.0
        self.part_fraction = pseudo.part_fraction if pseudo is not None else 0.0
        self.pseudo_by_class: dict[int, list[str]] = {}
        self.part_by_class: dict[int, list[str]] = {}
        # part episodes read their own label maps (a class's pixels split into its parts)
        self.part_labels: dict[str, torch.Tensor] = {}
        self.first_part_id = 256
        if self.part_fraction > 0:
            self.first_part_id = num_classes + 1 + (pseudo.clusters if self.pseudo_fraction > 0 else 0)
            high = ((i, self._stored(i)["high"]) for i in ids)
            self.part_labels, self.part_by_class = fit_part_classes(
                high, self.labels, by_class, pseudo.parts, self.first_part_id, seed, min_pixels
            )
            if not self.part_by_class:
                raise DataError(
                    "train.pseudo_classes.part_fraction > 0, but no part of a training class covers "
                    f"{min_pixels} pixels of an image; lower data.min_pixels or train.pseudo_classes.parts"
                )
        if self.pseudo_fraction > 0:
            high = ((i, self._stored(i)["high"]) for i in ids)
            self.labels, self.pseudo_by_class, _ = fit_pseudo_classes(
                high, self.labels, pseudo.clusters, num_classes + 1, seed, min_pixels
            )

    def _stored(self, image_id: str) -> dict[str, torch.Tensor]:
        feats = self.features.get(image_id)
        return feats if feats is not None else self.store.features(image_id)

    def episode(self, index: int):
        """Training episode ``index``: of a background pseudo-class with probability
        ``pseudo_classes.fraction``, of a part of a training class with probability ``part_fraction``, else
        of a training class (one independent draw, so without parts the episodes are those of before)."""
        mixed = self.pseudo_fraction > 0 or self.part_fraction > 0
        draw = np.random.default_rng([self.seed, index, 11]).random() if mixed else 1.0
        if draw < self.pseudo_fraction:
            return train_episode(self.pseudo_by_class, self.shots, self.seed, index)
        if draw < self.pseudo_fraction + self.part_fraction:
            return train_episode(self.part_by_class, self.shots, self.seed, index)
        return train_episode(self.by_class, self.shots, self.seed, index, self.negative)

    def _item(self, image_id: str, class_id: int, flip: bool):
        feats = self._stored(image_id)
        labels = self.part_labels if class_id >= self.first_part_id else self.labels
        mask = torch.from_numpy(binarize(labels[image_id].numpy(), class_id, self.ignore).astype(np.int64))
        if flip:
            feats = {k: v.flip(-1) for k, v in feats.items()}
            mask = mask.flip(-1)
        return feats, mask

    def batch(self, indices: list[int], device: torch.device) -> dict:
        q_feats, q_masks, s_feats, s_masks, class_ids = [], [], [], [], []
        for index in indices:
            ep = self.episode(index)
            class_ids.append(ep.class_id)
            flips = np.random.default_rng([self.seed, index, 7]).random(1 + self.shots) < self.flip
            f, m = self._item(ep.query, ep.class_id, bool(flips[0]))
            q_feats.append(f)
            q_masks.append(m)
            sup = [
                self._item(sid, ep.class_id, bool(fl)) for sid, fl in zip(ep.supports, flips[1:], strict=True)
            ]
            s_feats.append({k: torch.stack([s[0][k] for s in sup]) for k in f})
            s_masks.append(torch.stack([s[1] for s in sup]))
        keys = q_feats[0].keys()
        return {
            "query": {k: torch.stack([f[k] for f in q_feats]).to(device) for k in keys},
            "supports": {k: torch.stack([f[k] for f in s_feats]).to(device) for k in keys},
            "query_mask": torch.stack(q_masks).to(device),
            "support_masks": torch.stack(s_masks).to(device),
            "class_ids": torch.tensor(class_ids, device=device),
        }


def validation_episodes(cfg: Config, bench: Benchmark) -> list:
    """The validation episodes of a run: base classes, queries from the held-out training images (or,
    with ``data.val_classes``, the pseudo-novel classes held out of training).

    Supports may also come from training images, so that a base class with a single held-out image
    still forms episodes. These (never the test episodes) select checkpoints and tune settings."""
    split = bench.split
    if not split.val_pairs or cfg.train.val_episodes <= 0:
        return []
    return sample_test_episodes(
        split.val_pairs,
        cfg.train.val_episodes,
        cfg.data.shots,
        seed=10_000 + cfg.train.seed,
        support_pairs=split.val_pairs + split.train_pairs,
    )


def make_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trainable parameters of ``model``: SGD with momentum, AdamW or Adam, at
    ``train.lr``; those under ``train.slow_modules`` at ``train.lr * train.slow_lr``."""
    fast, slow = [], []
    matched = dict.fromkeys(t.slow_modules, False)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    for name, p in trainable:
        hits = [m for m in t.slow_modules if name == m or name.startswith(m + ".")]
        for m in hits:
            matched[m] = True
        (slow if hits else fast).append(p)
    missing = [m for m, hit in matched.items() if not hit]
    if missing:
        raise ConfigError(
            f"train.slow_modules: {', '.join(missing)} names no trainable parameter of this model "
            f"(model.method = {getattr(model, 'method', '?')}); expected prefixes such as "
            f"{', '.join(sorted({'.'.join(n.split('.')[:3]) for n, _ in trainable})[:6])}"
        )
    params = [{"params": fast, "lr": t.lr}] if fast else []
    if slow:
        params.append({"params": slow, "lr": t.lr * t.slow_lr})
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def poly_schedule(optimizer, steps: int, power: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - t / steps) ** power)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        output_dir: Path,
        device: torch.device,
        dist_info: DistInfo | None = None,
        progress: bool = True,
        bench: Benchmark | None = None,
    ):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.device = device
        self.info = dist_info or DistInfo()
        self.progress = progress and self.info.is_main
        if cfg.model.method in ("proto", "prior"):
            raise ConfigError(
                f"model.method = {cfg.model.method} is training-free; evaluate it with `dedn eval`"
            )
        self.bench = bench or build_benchmark(cfg.data, progress=self.progress)
        if self.bench.split.protocol == "cross":
            raise ConfigError(
                "data.protocol = cross is a test set (every class novel, no training pairs): train on a "
                "benchmark with base classes and score the checkpoint with `dedn eval` on this config"
            )
        if not self.bench.split.train_pairs:
            raise ConfigError("no training pairs: check data.fold, data.min_pixels and the data root")
        if cfg.model.method == "bam" and not cfg.train.feature_cache:
            raise ConfigError(
                "model.method = bam trains its base learner on stored features: set train.feature_cache=true"
            )
        torch.manual_seed(cfg.train.seed)
        self.model = FewShotSegmenter(cfg.model).to(device)
        t = cfg.train
        self.optimizer = make_optimizer(self.model, t)
        self.scheduler = poly_schedule(self.optimizer, t.steps, t.poly_power)
        self.step = 0
        self.best = {"miou": -1.0, "step": -1}
        self.by_class = pairs_by_class(self.bench.split.train_pairs)
        self.val_episodes = validation_episodes(cfg, self.bench)
        self.store = open_feature_store(
            cfg, self.model, self.bench.train_source, device, self.info, self.progress
        )
        self.val_cache = self.store or FeatureCache()
        self.ddp = None
        if self.info.enabled:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        return {
            "model": trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "config": to_dict(self.cfg),
            "best": dict(self.best),
            "rng": torch.get_rng_state(),
            "version": 1,
        }

    def save(self, name: str) -> Path:
        path = self.output_dir / "checkpoints" / name
        if self.info.is_main:
            save_checkpoint(path, self.state())
        return path

    def resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        check_compatible(checkpoint_config(state, path), self.cfg, path)
        load_model_state(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.best = dict(state.get("best", self.best))
        if "rng" in state:
            torch.set_rng_state(state["rng"])

    # ------------------------------------------------------------------ loop
    def _batches(self):
        cfg = self.cfg
        # the episodes of steps already done are skipped, not replayed: batch t is a function of t alone
        sampler = StepSampler(self.step, cfg.train.steps, cfg.train.batch_size, self.info)
        if cfg.train.feature_cache:
            episodes = FeatureEpisodes(
                self.model,
                self.bench.train_source,
                self.by_class,
                cfg.data.shots,
                cfg.data.image_size,
                cfg.train.augment.flip,
                cfg.train.seed,
                self.device,
                self.progress,
                self.store,
                cfg.train.negative_episodes,
                cfg.train.pseudo_classes,
                self.bench.train_source.num_classes,
                cfg.data.min_pixels,
            )
            if cfg.model.method == "bam" and self.step == 0:
                self._train_base_learner(episodes)
            for indices in sampler:
                yield episodes.batch(indices, self.device)
            return
        a = cfg.train.augment
        transform = TrainTransform(cfg.data.image_size, tuple(a.scale), a.rotate, a.blur, a.flip)
        # episode number = the sampler's global index (epoch 0 of a single long "epoch")
        dataset = TrainEpisodeDataset(
            self.bench.train_source,
            self.by_class,
            cfg.data.shots,
            cfg.train.seed,
            cfg.train.steps * cfg.train.batch_size,
            transform,
            cfg.train.negative_episodes,
        )
        # a private generator: the loader must not draw from the global RNG (that would shift dropout)
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=cfg.train.workers,
            generator=torch.Generator(),
            persistent_workers=False,
        )
        for batch in loader:
            yield {
                "query": batch["query_image"].to(self.device),
                "supports": batch["support_images"].to(self.device),
                "query_mask": batch["query_mask"].to(self.device),
                "support_masks": batch["support_masks"].to(self.device),
                "class_ids": batch["class_id"].to(self.device),
            }

    def _train_base_learner(self, episodes: FeatureEpisodes) -> None:
        """BAM's first stage (before the first episode): its base learner on the base classes' labels of
        the training images, then frozen (dedn.models.bam.train_base_learner)."""
        from dedn.models.bam import train_base_learner

        cfg = self.cfg
        base_ids = sorted(c for c in self.by_class if 1 <= c <= self.bench.train_source.num_classes)
        start = time.perf_counter()
        loss = train_base_learner(
            self.model.experts["bam"],
            episodes.labels,
            episodes._stored,
            base_ids,
            cfg.model.bam,
            cfg.train.seed,
            cfg.train.loss_size or cfg.data.image_size,
            cfg.train.augment.flip,
            self.device,
            log=lambda record: self.log({"step": 0, **record}),
        )
        self.log(
            {"step": 0, "base_learner_seconds": round(time.perf_counter() - start, 2), "loss/base": loss}
        )

    def _forward(self, batch: dict) -> dict:
        """The model on a batch, its logits at ``train.loss_size`` (``batch["query_mask"]`` is resized to
        match, nearest neighbour)."""
        net = self.ddp or self.model
        side = self.cfg.train.loss_size or self.cfg.data.image_size
        size = (side, side)
        mask = batch["query_mask"]
        if tuple(mask.shape[-2:]) != size:
            batch["query_mask"] = F.interpolate(mask[:, None].float(), size, mode="nearest")[:, 0].long()
        # images or stored features: the model takes either
        # the episode's class reaches only BAM (which leaves a base class out of its base-learner map)
        class_ids = batch.get("class_ids") if self.cfg.model.method == "bam" else None
        return net(
            batch["query"], batch["supports"], batch["support_masks"], out_size=size, class_ids=class_ids
        )

    def validate(self) -> dict | None:
        if not self.val_episodes:
            return None
        metric = evaluate_episodes(
            self.model,
            self.bench.train_source,
            self.val_episodes,
            self.bench.split.val_classes,
            self.cfg.data.image_size,
            self.device,
            self.val_cache,
            self.info,
            progress=False,
            class_ids=self.cfg.model.method == "bam",
        )
        self.model.train()
        return metric.compute()

    def log(self, record: dict) -> None:
        if not self.info.is_main:
            return
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def fit(self, stop_after: int | None = None) -> dict:
        """Train to ``train.steps`` (or stop early after ``stop_after`` steps, as an interruption would:
        the schedule stays the one for ``train.steps``)."""
        cfg = self.cfg
        t = cfg.train
        if self.info.is_main:
            make_dir(self.output_dir)
            atomic_write_text(self.output_dir / "config.yaml", dump_config(cfg))
            # the CPU's instruction set and thread count change a training's last bits (utils/machine.py)
            atomic_write_json(self.output_dir / "machine.json", machine_info(self.device))
        self.writer = None
        if self.info.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.output_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.writer = None
        self.model.train()
        use_amp = t.amp and self.device.type == "cuda"
        bar = tqdm(total=t.steps, initial=self.step, desc="train", disable=not self.progress)
        running: dict[str, float] = {}
        start = time.perf_counter()
        for batch in self._batches():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                out = self._forward(batch)
                losses = dedn_loss(out, batch["query_mask"], cfg.loss, self.model.expert_names)
            self.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            bar.update(1)
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + float(v.detach())
            if not math.isfinite(running["total"]):
                raise FloatingPointError(f"loss became {running['total']} at step {self.step}")
            if self.step % t.log_every == 0 or self.step == t.steps:
                n = t.log_every if self.step % t.log_every == 0 else self.step % t.log_every
                record = {
                    "step": self.step,
                    "lr": self.scheduler.get_last_lr()[0],
                    **{f"loss/{k}": v / n for k, v in running.items()},
                    "seconds": round(time.perf_counter() - start, 2),
                }
                bar.set_postfix(loss=f"{record['loss/total']:.3f}")
                self.log(record)
                running = {}
            if self.step % t.val_every == 0 or self.step == t.steps:
                val = self.validate()
                if val is not None and val["miou"] is not None:
                    self.log({"step": self.step, "val/miou": val["miou"], "val/fbiou": val["fbiou"]})
                    if val["miou"] > self.best["miou"]:
                        self.best = {"miou": val["miou"], "step": self.step}
                        self.save("best.pt")
            if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                self.save("last.pt")
            barrier(self.info)
            if stop_after is not None and self.step >= stop_after:
                break
        bar.close()
        if self.writer is not None:
            self.writer.close()
        if not self.val_episodes and self.info.is_main:
            self.save("best.pt")  # nothing to select on: the final model
        if self.info.is_main and (self.output_dir / "metrics.jsonl").is_file():
            from dedn.vis import plot_training_curves

            plot_training_curves(self.output_dir / "metrics.jsonl", self.output_dir / "curves.png")
        return {"steps": self.step, "best": self.best, "seconds": time.perf_counter() - start}
