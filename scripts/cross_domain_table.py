"""Score models trained on the offline PASCAL-5i folds on a cross-domain set (default: CamVid,
``configs/camvid_cross.yaml``; also ``configs/ccp_cross.yaml``), next to the training-free methods, on the
same episode files; or, with ``--config configs/pascal_offline.yaml``, each fold's model on its own test
fold.

Every fold's model is one run of ``dedn eval`` per fusion setting (``--matcher``; ``--previous`` adds the
fusion of round 12, AWF with ``proto`` and per-pixel confidence weighting); each run also scores every
expert alone, plain averaging and the `probe` matcher from the same forward pass. ``proto`` and ``prior``
do not depend on the fold and are scored once on a cross-domain set (once per fold on PASCAL-5i). The
table is the mean over the fold models (mIoU, FB-IoU and per-class IoU, each first averaged over the seeds
of a run), written to ``<out>/table.md`` and ``<out>/table.json`` (``--table NAME``: ``NAME.md``); a run
whose ``results.json`` exists is not repeated.

    python scripts/cross_domain_table.py \
        --checkpoint "runs/pascal-table/models/method=dedn-fold{fold}/checkpoints/best.pt"
    python scripts/cross_domain_table.py --checkpoint "..." --split val --seeds 0        # tuning: CamVid val
    python scripts/cross_domain_table.py --checkpoint "..." --shots 5 --out runs/camvid-5shot
    python scripts/cross_domain_table.py --config configs/ccp_cross.yaml --checkpoint "..." --previous
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dedn.config import load_config
from dedn.engine.benchmark import build_source
from dedn.utils.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "camvid_cross.yaml"
TRAINING_FREE = ("proto", "prior")
#: --matcher value -> (row name, extra settings)
FUSIONS = {
    "probe": (
        "dedn",
        [
            "model.fusion.matcher=probe",
            "model.fusion.confidence=false",
            "model.fusion.score=hard",
            "model.fusion.probe.fit=logistic",
        ],
    ),
    # round 19's option: the same with the probe fitted by ridge regression (docs/method.md, 2g)
    "ridge": (
        "dedn (ridge probe)",
        [
            "model.fusion.matcher=probe",
            "model.fusion.confidence=false",
            "model.fusion.score=hard",
            "model.fusion.probe.fit=ridge",
        ],
    ),
    # round 13's default: the same, each member scored by the soft IoU of its probabilities
    "soft": (
        "dedn (round 13: soft support scores)",
        ["model.fusion.matcher=probe", "model.fusion.confidence=false", "model.fusion.score=soft"],
    ),
    "proto": ("dedn (AWF + proto)", ["model.fusion.matcher=proto", "model.fusion.confidence=false"]),
    "none": ("dedn (AWF, experts only)", ["model.fusion.matcher=none", "model.fusion.confidence=false"]),
    # round 12's default: the matcher proto, each pixel weighted by each member's confidence
    "previous": (
        "dedn (round 12: AWF + proto, confidence)",
        ["model.fusion.matcher=proto", "model.fusion.confidence=true"],
    ),
}


def run_eval(config: Path, out: Path, sets: list[str], checkpoint: str | None = None) -> dict:
    """``dedn eval`` into ``out`` (once): its results.json, with the wall time."""
    results = out / "results.json"
    if not results.exists():
        args = [sys.executable, "-m", "dedn.cli", "eval", str(config), "--quiet", "--output", str(out)]
        if checkpoint:
            args += ["--checkpoint", checkpoint]
        start = time.perf_counter()
        subprocess.run([*args, *[a for s in sets for a in ("--set", s)]], check=True, cwd=REPO)
        atomic_write_json(out / "times.json", {"eval_seconds": time.perf_counter() - start})
    return json.loads(results.read_text())


def eval_seconds(run: Path, result: dict) -> float:
    """The wall time of a run: times.json, or the evaluation's own figure (a run made outside this
    script)."""
    times = run / "times.json"
    return json.loads(times.read_text())["eval_seconds"] if times.exists() else result["seconds"]


def entries(result: dict, prefix: str) -> dict[str, dict]:
    """Row name -> summary of every method a results.json scored (the model and what came with it)."""
    method = result["method"]
    rows = {prefix or method: result["summary"]}
    for name, summary in result.get("experts", {}).items():
        if name == "matcher=probe" and prefix == FUSIONS["ridge"][0]:
            rows["probe, ridge fit (training-free)"] = summary
            continue
        if name == "matcher=proto" or (name.startswith("matcher=") and prefix != FUSIONS["probe"][0]):
            continue  # proto is a row of its own; the probe is shown once, from the default fusion's runs
        if name.startswith("matcher="):
            rows[name.replace("matcher=", "") + " (training-free, fitted to the support)"] = summary
            continue
        label = f"{name} expert" if "=" not in name else name.replace("fusion=", "fusion ")
        rows[f"{prefix} / {label}" if prefix else label] = summary
    return rows


def mean_over(summaries: list[dict]) -> dict:
    """Mean over fold models of mIoU, FB-IoU and per-class IoU (each a mean over seeds already)."""
    classes = sorted({c for s in summaries for c in s["class_iou"]}, key=int)
    return {
        "miou": sum(s["miou"]["mean"] for s in summaries) / len(summaries),
        "fbiou": sum(s["fbiou"]["mean"] for s in summaries) / len(summaries),
        # on PASCAL-5i each fold model scores its own classes: a class's mean is over the models that have it
        "class_iou": {
            c: statistics.mean(s["class_iou"][c]["mean"] for s in summaries if c in s["class_iou"])
            for c in classes
        },
        "models": len(summaries),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="each fold's trained model ('{fold}': the fold)")
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument(
        "--split", default=None, help="the set's split (default: the config's; tune on val, report on test)"
    )
    parser.add_argument(
        "--matcher", nargs="+", default=["probe"], choices=list(FUSIONS), help="the fusions to score"
    )
    parser.add_argument(
        "--training-free",
        nargs="*",
        default=list(TRAINING_FREE),
        choices=list(TRAINING_FREE),
        help="the training-free rows (default: proto prior; none: leave them out)",
    )
    parser.add_argument("--previous", action="store_true", help="also round 12's fusion (--matcher previous)")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--out", default=str(REPO / "runs" / "cross-domain"))
    parser.add_argument(
        "--table", default="table", help="name of the table files in --out (another subset of folds or rows)"
    )
    parser.add_argument("--set", dest="extra", action="append", default=[], help="override for every run")
    args = parser.parse_args()
    out = Path(args.out)
    common = [
        *([f"data.test_split={args.split}"] if args.split else []),
        f"data.shots={args.shots}",
        f"eval.episodes={args.episodes}",
        f"eval.seeds=[{', '.join(map(str, args.seeds))}]",
        f"eval.episode_dir={out / 'episodes'}",
        *args.extra,
    ]
    config = Path(args.config)
    cross = load_config(config).data.protocol == "cross"
    table: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for method in args.training_free:
        for fold in [None] if cross else args.folds:  # on PASCAL-5i each fold has its own classes
            run = out / "eval" / (method if cross else f"{method}-fold{fold}")
            fold_set = [] if cross else [f"data.fold={fold}"]
            result = run_eval(config, run, [*common, *fold_set, f"model.method={method}"])
            table.setdefault(method, []).append(result["summary"])
            seconds[run.name] = eval_seconds(run, result)
    fusions = [*args.matcher, *(["previous"] if args.previous and "previous" not in args.matcher else [])]
    for matcher in fusions:
        name, settings = FUSIONS[matcher]
        for fold in args.folds:
            run = out / "eval" / f"dedn-{matcher}-fold{fold}"
            ckpt = args.checkpoint.replace("{fold}", str(fold))
            fold_set = [] if cross else [f"data.fold={fold}"]
            result = run_eval(config, run, [*common, *fold_set, *settings], ckpt)
            for row, summary in entries(result, name).items():
                table.setdefault(row, []).append(summary)
            seconds[f"{name} fold {fold}"] = eval_seconds(run, result)
    rows = {row: mean_over(s) for row, s in table.items()}
    classes = sorted(next(iter(rows.values()))["class_iou"], key=int)
    data = load_config(config, common).data
    names = build_source(data, data.test_split).class_names
    header = [names[int(c) - 1] for c in classes]
    lines = [
        f"# {config.name}, split {data.test_split}, {args.shots}-shot, {args.episodes} episodes x "
        f"seeds {args.seeds}; trained rows: mean over the models of folds {args.folds}",
        "",
        "| method | mIoU | FB-IoU | " + " | ".join(header) + " |",
        "|---|---|---|" + "---|" * len(header),
    ]
    for row, r in rows.items():
        cells = " | ".join(f"{100 * r['class_iou'].get(c, float('nan')):.1f}" for c in classes)
        lines.append(f"| {row} | {100 * r['miou']:.1f} | {100 * r['fbiou']:.1f} | {cells} |")
    atomic_write_json(out / f"{args.table}.json", {"rows": rows, "seconds": seconds, "settings": vars(args)})
    atomic_write_text(out / f"{args.table}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
