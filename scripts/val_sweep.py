"""Tune a setting on the validation hold-out (never on the test episodes), fold by fold.

For each fold and each value of ``--param``, a training-free method is scored on the validation
episodes (base classes, queries from the held-out training images, see ``validation_episodes``; or, with
``--set "data.val_classes=[...]"``, pseudo-novel classes held out of training), and a
trained method is trained with that value and scored by its best validation mIoU. Every trial is written
to ``<out>/sweep.json`` and ``<out>/sweep.md`` with its wall time.

    python scripts/val_sweep.py --param model.baseline.prior_threshold --values 0.3 0.4 0.5 0.6 0.7 \\
        --set model.method=prior
    python scripts/val_sweep.py --param loss.distill.weight --values 0.5 1 2 --folds 0 \\
        --set model.method=dedn --set train.steps=400
    python scripts/val_sweep.py --param model.fusion.temperature --values 0.02 0.1 \\
        --checkpoint "runs/pascal-table/models/method=dedn-fold{fold}/checkpoints/best.pt"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dedn.config import load_config
from dedn.engine.benchmark import build_benchmark
from dedn.engine.checkpoint import load_trained_model
from dedn.engine.evaluate import evaluate_episodes
from dedn.engine.features import open_feature_store
from dedn.engine.train import Trainer, validation_episodes
from dedn.models.network import FewShotSegmenter
from dedn.utils.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def trial(config: str, overrides: list[str], out: Path, checkpoint: str | None = None) -> dict:
    cfg = load_config(config, overrides)
    cpu = torch.device("cpu")
    start = time.perf_counter()
    if cfg.model.method in ("proto", "prior") or checkpoint:
        bench = build_benchmark(cfg.data)
        model = load_trained_model(cfg, checkpoint, cpu)[0] if checkpoint else FewShotSegmenter(cfg.model)
        model.eval()
        store = open_feature_store(cfg, model, bench.train_source, cpu, progress=False)
        episodes = validation_episodes(cfg, bench)
        experts: dict = {}
        metric = evaluate_episodes(
            *(model, bench.train_source, episodes, bench.split.val_classes, cfg.data.image_size, cpu, store),
            progress=False,
            expert_metrics=experts,
        )
        miou, step = metric.compute()["miou"], None
        extra = {f"val_miou_{name}": m.compute()["miou"] for name, m in experts.items()}
    else:
        trainer = Trainer(cfg, out, cpu, progress=False)
        best = trainer.fit()["best"]
        miou, step = best["miou"], best["step"]
        extra = {}
    seconds = time.perf_counter() - start
    return {"overrides": overrides, "val_miou": miou, "best_step": step, **extra, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "pascal_offline.yaml"))
    parser.add_argument("--param", required=True, help="the setting to tune, e.g. loss.distill.weight")
    parser.add_argument("--values", nargs="+", required=True)
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--set", dest="extra", action="append", default=[], help="fixed override")
    parser.add_argument("--out", default=None, help="default: runs/val-sweep/<param>")
    parser.add_argument(
        "--checkpoint",
        help="score this trained model ('{fold}' is replaced by the fold) instead of training one: "
        "for test-time settings such as model.fusion.temperature",
    )
    args = parser.parse_args()
    out = Path(args.out or REPO / "runs" / "val-sweep" / args.param)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "sweep.json"
    trials = json.loads(results_file.read_text()) if results_file.exists() else []
    done = {json.dumps(t["overrides"]) for t in trials}
    for fold in args.folds:
        for value in args.values:
            overrides = [*args.extra, f"data.fold={fold}", f"{args.param}={value}"]
            if json.dumps(overrides) in done:
                continue
            checkpoint = args.checkpoint.replace("{fold}", str(fold)) if args.checkpoint else None
            t = trial(args.config, overrides, out / f"fold{fold}-{value}", checkpoint)
            t.update({"fold": fold, "value": value})
            trials.append(t)
            atomic_write_json(results_file, trials)
            experts = "".join(f", {k[9:]} {100 * v:.1f}" for k, v in t.items() if k.startswith("val_miou_"))
            print(f"fold {fold} {args.param}={value}: val mIoU {100 * t['val_miou']:.1f}{experts}")
    lines = [
        f"# validation sweep of {args.param} ({' '.join(args.extra)})",
        "",
        "| value | " + " | ".join(f"fold {f}" for f in args.folds) + " | mean |",
        "|---|" + "---|" * (len(args.folds) + 1),
    ]
    for value in args.values:
        got = [t["val_miou"] for f in args.folds for t in trials if t["fold"] == f and t["value"] == value]
        cells = " | ".join(f"{100 * v:.1f}" for v in got)
        mean = f"{100 * sum(got) / len(got):.1f}" if got else "-"
        lines.append(f"| {value} | {cells} | {mean} |")
    atomic_write_text(out / "sweep.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
