"""Test-time padding: the ImageNet mean (this project) against 0 (PFENet's and BAM's test resize).

Scores one trained model (or a training-free method) on the same test episodes twice, once with the test
images padded with the ImageNet mean and once with black, and prints mIoU and FB-IoU of each. Both arms
encode the test images in memory (the feature store holds mean-padded features only); everything else,
including the model trained with mean-padded crops, is the same.

    OMP_NUM_THREADS=1 python scripts/pad_fill.py configs/pascal_offline.yaml \\
        --checkpoint runs/pascal-offline/fold0/checkpoints/best.pt --set data.fold=0 --seeds 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dedn.config import load_config
from dedn.data.transforms import PAD_RGB
from dedn.engine.benchmark import build_benchmark
from dedn.engine.distributed import resolve_device
from dedn.engine.evaluate import episode_file, evaluate_episodes, load_or_make_episodes
from dedn.engine.features import FeatureCache
from dedn.errors import DednError
from dedn.metrics import aggregate_seeds
from dedn.utils.io import atomic_write_json

FILLS = {"mean": PAD_RGB, "zero": (0.0, 0.0, 0.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("--checkpoint", help="trained weights (not for proto / prior)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="test seeds (default: 0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--out", help="write the figures to this JSON file")
    parser.add_argument("--episode-dir", default="runs/episodes", help="where the episode files are")
    args = parser.parse_args(argv)
    try:
        return compare(args)
    except DednError as e:
        raise SystemExit(f"pad_fill: {e}") from None


def compare(args) -> int:
    from dedn.engine.checkpoint import load_trained_model
    from dedn.engine.distributed import DistInfo

    cfg = load_config(args.config, args.overrides)
    cfg.eval.episode_dir = args.episode_dir
    device = resolve_device(cfg.device)
    model, _ = load_trained_model(cfg, args.checkpoint, device)
    bench = build_benchmark(cfg.data)
    results: dict[str, dict] = {}
    for name, fill in FILLS.items():
        cache = FeatureCache()  # in memory: each arm encodes the test images with its own padding
        per_seed = []
        start = time.perf_counter()
        for seed in args.seeds:
            path = episode_file(cfg, bench, seed, cfg.eval.episodes, Path(args.episode_dir))
            episodes = load_or_make_episodes(cfg, bench, seed, path, DistInfo())
            source, size = bench.test_source, cfg.data.image_size
            metric = evaluate_episodes(
                model, source, episodes, bench.split.novel, size, device, cache, progress=False, pad_fill=fill
            )
            per_seed.append(metric.compute(cfg.eval.missing_class))
        summary = aggregate_seeds(per_seed)
        results[name] = {
            "fill": list(fill),
            "miou": summary["miou"]["mean"],
            "fbiou": summary["fbiou"]["mean"],
            "per_seed": [r["miou"] for r in per_seed],
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(
            f"pad {name:4s} {fill}: mIoU {100 * results[name]['miou']:.2f}, "
            f"FB-IoU {100 * results[name]['fbiou']:.2f} ({results[name]['seconds']} s)",
            flush=True,
        )
    diff = 100 * (results["zero"]["miou"] - results["mean"]["miou"])
    print(
        f"{cfg.model.method}, fold {bench.fold}, {cfg.data.shots}-shot, seeds {args.seeds}: "
        f"zero - mean = {diff:+.2f} mIoU"
    )
    if args.out:
        atomic_write_json(
            args.out,
            {
                "method": cfg.model.method,
                "checkpoint": args.checkpoint,
                "fold": bench.fold,
                "shots": cfg.data.shots,
                "seeds": args.seeds,
                "episodes": cfg.eval.episodes,
                "image_size": cfg.data.image_size,
                "backbone": cfg.model.backbone,
                "results": results,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
