"""Does a trained model use its support? Score each query once with its own supports and once with the
supports (images and masks) of an episode of another class, on the query's class.

A model that matches query to support should collapse on the swapped episodes; a model that has learned a
class-agnostic "salient object" detector from the base classes keeps its score. ``--split test`` uses the
first ``--episodes`` 1-shot test episodes of seed 0 from the table's episode files; ``--split val`` the
validation episodes of the fold (base classes, held-out training images: usable for design decisions).
Models: the table's fold models, or ``--checkpoint`` with ``{method}`` and ``{fold}`` placeholders.

    python scripts/support_swap.py --fold 0 --episodes 300
    python scripts/support_swap.py --fold 0 --split val --methods dedn \
        --checkpoint 'runs/x/{method}-fold{fold}/checkpoints/best.pt' --set train.negative_episodes=0.3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dedn.config import load_config
from dedn.data.episodes import binarize, read_episodes
from dedn.engine.benchmark import build_benchmark
from dedn.engine.checkpoint import load_trained_model
from dedn.engine.evaluate import EpisodeRunner
from dedn.engine.features import open_feature_store
from dedn.engine.train import validation_episodes
from dedn.metrics import FewShotIoU

REPO = Path(__file__).resolve().parents[1]


class SwappedRunner(EpisodeRunner):
    @torch.no_grad()
    def run_with(self, episode, donor):
        """Query and class of ``episode``; supports and support class of ``donor``."""
        label = self.label(episode.query)
        q = self._features(episode.query)
        s = [self._features(sid) for sid in donor.supports]
        out = self.model.forward_features(
            {k: v.unsqueeze(0) for k, v in q.items()},
            {k: torch.stack([f[k] for f in s]).unsqueeze(0) for k in q},
            self.support_masks(donor),
            (self.size, self.size),
        )
        target = torch.from_numpy(binarize(label, episode.class_id, self.ignore).astype(np.int64))
        return self.prediction(out["logits"], label.shape[:2]), target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--table", default=str(REPO / "runs" / "pascal-table"))
    parser.add_argument("--methods", nargs="+", default=["proto", "object", "scenario", "dedn"])
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--checkpoint", help="checkpoint path pattern with {method} and {fold}")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides (KEY=VALUE)")
    args = parser.parse_args()
    table, f, n = Path(args.table), args.fold, args.episodes
    cpu = torch.device("cpu")
    print(f"{args.split} episodes, fold {f}")
    print("| method | own class's support | another class's support |\n|---|---|---|")
    for method in args.methods:
        cfg = load_config(
            str(REPO / "configs" / "pascal_offline.yaml"),
            [f"data.fold={f}", f"model.method={method}", *args.set],
        )
        checkpoint = None
        if method not in ("proto", "prior"):
            pattern = args.checkpoint or str(
                table / "models" / "method={method}-fold{fold}" / "checkpoints" / "best.pt"
            )
            checkpoint = pattern.format(method=method, fold=f)
        model, _ = load_trained_model(cfg, checkpoint, cpu)
        bench = build_benchmark(cfg.data)
        if args.split == "val":
            source, classes = bench.train_source, bench.split.base
            episodes = validation_episodes(cfg, bench)[:n]
        else:
            source, classes = bench.test_source, bench.split.novel
            episodes, _ = read_episodes(table / "episodes" / f"pascal-fold{f}-1shot-seed0-n1000.json")
            episodes = episodes[:n]
        m = len(episodes)
        donors = [
            next(episodes[j % m] for j in range(i + 1, i + m) if episodes[j % m].class_id != e.class_id)
            for i, e in enumerate(episodes)
        ]
        store = open_feature_store(cfg, model, source, cpu, progress=False)
        runner = SwappedRunner(model, source, cfg.data.image_size, cpu, store)
        scores = []
        for swap in (False, True):
            metric = FewShotIoU(classes)
            for episode, donor in zip(episodes, donors, strict=True):
                metric.update(*runner.run_with(episode, donor if swap else episode), episode.class_id)
            scores.append(100 * metric.compute()["miou"])
        print(f"| {method} | {scores[0]:.1f} | {scores[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
