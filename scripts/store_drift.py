"""Does this machine encode images exactly as the feature store it reads was encoded?

Encodes the first ``--images`` images of a config's data set again, here and now, and prints the largest
difference from the stored features, next to what the store recorded about the machine that built it.
A zero means trainings here read the same numbers a fresh ``dedn features`` would give; a difference in
the last bits (1e-6 to 1e-4) means another thread count or instruction set, and is enough for a 500-step
training to end a point of mIoU away (docs/method.md). Try ``ATEN_CPU_CAPABILITY=default`` or
``OMP_NUM_THREADS=2`` to see the drift on one machine.

    OMP_NUM_THREADS=1 python scripts/store_drift.py configs/pascal_offline.yaml --images 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dedn.config import load_config
from dedn.data.transforms import TestTransform
from dedn.engine.benchmark import build_benchmark
from dedn.engine.distributed import resolve_device
from dedn.engine.features import FeatureStore, feature_store_key
from dedn.errors import DednError
from dedn.models.network import FewShotSegmenter
from dedn.utils.io import cache_dir
from dedn.utils.machine import machine_info


def drift(model, source, store: FeatureStore, image_size: int, device, images: int) -> dict[str, float]:
    """Largest absolute difference per feature between the store and a fresh encoding."""
    transform = TestTransform(image_size)
    worst: dict[str, float] = {}
    with torch.no_grad():
        for image_id in list(source.ids)[:images]:
            fresh = model.encode(transform(source.load_image(image_id))[0].unsqueeze(0).to(device))
            stored = store.features(image_id)
            for name, value in fresh.items():
                d = (value[0].cpu() - stored[name]).abs().max().item()
                worst[name] = max(worst.get(name, 0.0), d)
    return worst


def main(argv: list[str] | None = None) -> int:
    try:
        return compare(argv)
    except DednError as e:  # a bad config or data set: its message names the file, no traceback
        raise SystemExit(f"store_drift: {e}") from None


def compare(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("--images", type=int, default=3, help="how many images to encode again")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--strict", action="store_true", help="exit with 1 when any feature differs")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.feature_store:
        raise SystemExit(f"{args.config}: feature_store is off; there is no store to compare with")
    device = resolve_device(cfg.device)
    bench = build_benchmark(cfg.data, progress=False)
    model = FewShotSegmenter(cfg.model).to(device).eval()
    root = cache_dir() / "features" if cfg.feature_store == "auto" else Path(cfg.feature_store)
    here = machine_info(device)
    print(f"this machine: {json.dumps(here)}")
    sources = [bench.train_source]
    if bench.test_source is not bench.train_source:
        sources.append(bench.test_source)
    differs = False
    for source in sources:
        key = feature_store_key(source, model.cfg, cfg.data.image_size, model.mid_levels, model.high_levels)
        folder = root / key
        if not (folder / "index.json").is_file():
            raise SystemExit(f"{folder}: no feature store; build it first with `dedn features {args.config}`")
        index = json.loads((folder / "index.json").read_text())
        built = index.get("machine") or {"threads": index.get("threads"), "note": "not recorded"}
        print(f"{source.name}: store {folder}")
        print(f"  built on: {json.dumps(built)}")
        worst = drift(model, source, FeatureStore(folder), cfg.data.image_size, device, args.images)
        for name, d in sorted(worst.items()):
            print(f"  {name}: largest difference over {args.images} images {d:.3g}")
            differs |= d > 0
    return 1 if args.strict and differs else 0


if __name__ == "__main__":
    sys.exit(main())
