"""Make a shipped model from a training run: its weights, stripped of the optimizer state, go into
``src/dedn/resources/models/<name>.pt``, listed in ``manifest.json`` with their sha256, the run's
settings, training data and figures (any results.json given with --results, e.g. CamVid's).

    dedn train configs/release.yaml --output runs/release
    dedn eval configs/camvid_cross.yaml --checkpoint runs/release/checkpoints/best.pt \
        --output runs/release-camvid
    python scripts/release_model.py runs/release --name dedn-lite2-voc20 \
        --results runs/release-camvid/results.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import torch

from dedn.engine.checkpoint import checkpoint_config, load_checkpoint
from dedn.errors import DednError
from dedn.pretrained import MANIFEST
from dedn.utils.io import atomic_write, atomic_write_json

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "src" / "dedn" / "resources" / "models"


def figures(path: Path) -> dict:
    """The headline numbers of one results.json (mIoU, FB-IoU, per class, with their settings)."""
    r = json.loads(path.read_text())
    s = r["settings"]
    names = {int(k): v for k, v in s["class_names"].items()}
    config = r.get("config", {})
    fusion = config.get("model", {}).get("fusion", {})
    return {
        "set": Path(config.get("data", {}).get("root") or "").name,
        "split": config.get("data", {}).get("test_split"),
        "fusion": {
            **{k: fusion[k] for k in ("matcher", "confidence", "score") if k in fusion},
            **({"probe_fit": fusion["probe"]["fit"]} if "fit" in fusion.get("probe", {}) else {}),
        },
        "benchmark": s["benchmark"],
        "protocol": s["protocol"],
        "shots": s["shots"],
        "episodes": s["episodes"],
        "seeds": s["seeds"],
        "image_size": s["image_size"],
        "miou": round(100 * r["summary"]["miou"]["mean"], 2),
        "fbiou": round(100 * r["summary"]["fbiou"]["mean"], 2),
        "class_iou": {names[int(c)]: round(100 * v["mean"], 2) for c, v in r["summary"]["class_iou"].items()},
        "experts": {k: round(100 * v["miou"]["mean"], 2) for k, v in r.get("experts", {}).items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a training run's output folder")
    parser.add_argument("--name", required=True, help="the shipped model's name (file name without .pt)")
    parser.add_argument(
        "--checkpoint", default="best.pt", help="which checkpoint of the run (default best.pt)"
    )
    parser.add_argument("--results", type=Path, nargs="*", default=[], help="results.json files to list")
    parser.add_argument("--training-data", default="", help="what it was trained on, in words")
    parser.add_argument("--default", action="store_true", help="make it the default shipped model")
    parser.add_argument("--out", type=Path, default=MODELS, help="the models folder (default: the package's)")
    args = parser.parse_args(argv)
    try:
        return release(args)
    except DednError as e:
        raise SystemExit(f"release_model: {e}") from None


def release(args) -> int:
    source = args.run / "checkpoints" / args.checkpoint
    state = load_checkpoint(source)
    cfg = checkpoint_config(state, source)
    shipped = {"model": state["model"], "config": state["config"], "step": state.get("step")}
    shipped["best"] = state.get("best")
    shipped["version"] = state.get("version", 1)
    buffer = io.BytesIO()
    torch.save(shipped, buffer)
    data = buffer.getvalue()
    target = atomic_write(args.out / f"{args.name}.pt", lambda f: f.write(data))
    manifest_path = args.out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"models": {}}
    machine = args.run / "machine.json"
    manifest["models"][args.name] = {
        "file": target.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "method": cfg.model.method,
        "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size,
        "training_data": args.training_data
        or f"{cfg.data.benchmark} ({cfg.data.root}), protocol {cfg.data.protocol}, fold {cfg.data.fold}",
        "training": {
            "steps": cfg.train.steps,
            "batch_size": cfg.train.batch_size,
            "lr": cfg.train.lr,
            "seed": cfg.train.seed,
            "pseudo_classes": cfg.train.pseudo_classes.fraction,
            "validation_miou": round(100 * (state.get("best") or {}).get("miou", float("nan")), 2),
            "machine": json.loads(machine.read_text()) if machine.is_file() else None,
        },
        "figures": [figures(p) for p in args.results],
    }
    if args.default or "default" not in manifest:
        manifest["default"] = args.name
    atomic_write_json(manifest_path, manifest)
    print(f"{target} ({len(data) / 1e6:.1f} MB), sha256 {manifest['models'][args.name]['sha256'][:16]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
