"""Run the offline PASCAL-5i table: methods x folds x shots (and the ablations), then collect it.

Every row is ``configs/pascal_offline.yaml`` plus the overrides printed next to it, trained with
``dedn train`` (trained methods) and scored with ``dedn eval`` on the same episode files (one per fold,
shot count and seed). Wall times are recorded per run. Results are collected into ``<out>/table.md``
and ``<out>/table.json``; a run whose ``results.json`` already exists is not repeated.

    python scripts/pascal_table.py --folds 0 --shots 1                 # one fold, 1-shot, main methods
    python scripts/pascal_table.py --folds 0 1 2 3 --shots 1 5         # the main table
    python scripts/pascal_table.py --folds 0 1 2 3 --shots 1 --ablations
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pascal_offline.yaml"
TRAINING_FREE = ("proto", "prior")

#: row name -> overrides of configs/pascal_offline.yaml
METHODS = {
    "dedn": ["model.method=dedn"],
    "object": ["model.method=object"],
    "scenario": ["model.method=scenario"],
    "proto": ["model.method=proto"],
    "prior": ["model.method=prior"],
}
ABLATIONS = {
    "dedn w/o Scenario Normalization": ["model.method=dedn", "model.scenario.normalization=none"],
    "dedn w/o Object Continuity Guidance": ["model.method=dedn", "model.object.ocg.enabled=false"],
    "dedn w/o contrastive term": ["model.method=dedn", "loss.contrast.weight=0"],
    "dedn w/o positive-guided KL": ["model.method=dedn", "loss.distill.mode=off"],
    "dedn, plain averaging instead of AWF": ["model.method=dedn", "model.fusion.mode=mean"],
    "dedn, PKL foreground-only": ["model.method=dedn", "loss.distill.mode=foreground"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def dedn(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dedn.cli", *args], check=True, cwd=REPO)
    return time.perf_counter() - start


def run_row(name, overrides, fold, shots, out: Path, extra: list[str]) -> dict:
    sets = [*overrides, f"data.fold={fold}", f"data.shots={shots}", *extra]
    flags = [a for s in sets for a in ("--set", s)]
    run = out / f"{slug(name)}-fold{fold}-{shots}shot"
    results_file = run / "eval" / "results.json"
    record = {"row": name, "fold": fold, "shots": shots, "overrides": sets}
    if not results_file.exists():
        trained = not any(o in (f"model.method={m}" for m in TRAINING_FREE) for o in overrides)
        eval_flags = ["--set", f"eval.episode_dir={out / 'episodes'}"]
        if trained:
            record["train_seconds"] = dedn(
                "train", str(CONFIG), "--quiet", "--output", str(run / "train"), *flags
            )
            ckpt = ["--checkpoint", str(run / "train" / "checkpoints" / "best.pt")]
        else:
            ckpt = []
        record["eval_seconds"] = dedn(
            "eval", str(CONFIG), "--quiet", "--output", str(run / "eval"), *ckpt, *flags, *eval_flags
        )
        (run / "times.json").write_text(json.dumps(record, indent=2))
    results = json.loads(results_file.read_text())
    times = json.loads((run / "times.json").read_text()) if (run / "times.json").exists() else {}
    record.update({k: v for k, v in times.items() if k.endswith("seconds")})
    record["miou"] = results["summary"]["miou"]
    record["fbiou"] = results["summary"]["fbiou"]
    record["settings"] = results["settings"]
    return record


def table(records: list[dict]) -> str:
    folds = sorted({r["fold"] for r in records})
    lines = []
    for shots in sorted({r["shots"] for r in records}):
        lines += [
            f"### {shots}-shot (mIoU %, mean +- std over seeds; FB-IoU of the fold mean)",
            "",
            "| method | " + " | ".join(f"fold {f}" for f in folds) + " | mean mIoU | mean FB-IoU |",
            "|---|" + "---|" * (len(folds) + 2),
        ]
        for row in dict.fromkeys(r["row"] for r in records if r["shots"] == shots):
            cells, means, fbs = [], [], []
            for f in folds:
                r = next(
                    (r for r in records if r["row"] == row and r["fold"] == f and r["shots"] == shots), None
                )
                if r is None:
                    cells.append("-")
                    continue
                cells.append(f"{100 * r['miou']['mean']:.1f} +- {100 * r['miou']['std']:.1f}")
                means.append(r["miou"]["mean"])
                fbs.append(r["fbiou"]["mean"])
            mean = f"{100 * sum(means) / len(means):.1f}" if len(means) == len(folds) else "-"
            fb = f"{100 * sum(fbs) / len(fbs):.1f}" if len(fbs) == len(folds) else "-"
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {mean} | {fb} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ablations", action="store_true", help="the ablation rows instead of the methods")
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], help="extra override for every row"
    )
    parser.add_argument("--out", default=str(REPO / "runs" / "pascal-table"))
    args = parser.parse_args()
    out = Path(args.out)
    rows = ABLATIONS if args.ablations else {m: METHODS[m] for m in args.methods}
    records = []
    for shots in args.shots:
        for fold in args.folds:
            for name, overrides in rows.items():
                records.append(run_row(name, overrides, fold, shots, out, args.extra))
                r = records[-1]
                print(
                    f"{name} fold {fold} {shots}-shot: mIoU {100 * r['miou']['mean']:.1f} "
                    f"(train {r.get('train_seconds', 0):.0f} s, eval {r.get('eval_seconds', 0):.0f} s)",
                    flush=True,
                )
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(records, indent=2))
    (out / "table.md").write_text(table(records))
    print(table(records))


if __name__ == "__main__":
    main()
