"""Run every table of the offline PASCAL-5i results with the current defaults, several runs at a time.

The tables (``docs/results.md``, "Current figures") and the ``scripts/pascal_table.py`` invocations that
make them, one per table, fold and trained model:

- ``main-1shot``: DEDN, its two experts trained alone, the peers PFENet, HSNet, BAM and HDMNet (trained
  in the same harness, on the same features and episodes, each with its own recipe and length: the
  settings of ``configs/<method>_offline.yaml``) and the training-free ``proto`` and ``prior``; 1-shot,
  5 test seeds x 1,000 episodes per fold.
- ``main-5shot``: the same rows at 5 shots, each trained model trained on 5-shot episodes
  (``--train-shots test``); 5 test seeds.
- ``ablations``: DEDN and each removal the issue lists (Scenario Normalization, Object Continuity
  Guidance, the contrastive term, the positive-guided KL) and the other reading of "positive-guided"
  (correct-teacher); 1-shot, test seed 0. Plain averaging and the learned gate instead of AWF are
  scored from the DEDN row's own forward pass (``table.md``'s list of experts and fusions).

Each group writes ``<root>/<group>/table.md`` and ``table.json`` (collected once all its runs are done).
Each group's folder stands alone: ``ablations`` trains its own DEDN, the same model as ``main-1shot``'s
(same settings and seed), scored on test seed 0 only.
Runs already finished are not repeated, so an interrupted call picks up where it stopped. Every run is
one process with ``--threads`` threads; ``--jobs`` of them at a time (on this project's 2-core CPU:
``--jobs 2 --threads 1``). Trained runs start first, longest first, so the cores stay busy to the end.

    python scripts/pascal_all.py --dry-run                    # the commands, in the order they start
    python scripts/pascal_all.py --groups ablations --jobs 2  # one table
    python scripts/pascal_all.py                              # all three (days on 2 cores)

Cost: with the peers at their own lengths, their 1-shot trainings alone take about 12.5 hours of one core
(per fold: PFENet 1,100 s, HSNet 5,860 s, BAM 1,900 s, HDMNet 2,300 s, docs/results.md), so
``main-1shot`` takes about 10 hours on the 2 cores with DEDN's rows and the scoring; ``main-5shot``
trains every model again on 5-shot episodes, which costs more per step (HSNet runs one 4D pass per shot).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "scripts" / "pascal_table.py"

#: the trained rows of each table (one invocation per fold and row: each trains its own model) and its
#: training-free rows (one invocation per fold for all of them)
MAIN_TRAINED = ["dedn", "object", "scenario", "pfenet", "hsnet", "bam", "hdmnet"]
MAIN_FREE = ["proto", "prior"]
ABLATION_ROWS = [
    "dedn",
    "dedn w/o Scenario Normalization",
    "dedn w/o Object Continuity Guidance",
    "dedn w/o contrastive term",
    "dedn w/o positive-guided KL",
    "dedn, PKL correct-teacher",
]

#: group -> (shots, pascal_table flags, trained rows, training-free rows)
GROUPS: dict[str, tuple[int, list[str], list[str], list[str]]] = {
    "main-1shot": (1, [], MAIN_TRAINED, MAIN_FREE),
    "main-5shot": (5, ["--train-shots", "test"], MAIN_TRAINED, MAIN_FREE),
    "ablations": (1, ["--set", "eval.seeds=[0]"], ABLATION_ROWS, []),
}

#: rough cost of one run on the 2-core CPU, two runs at a time (seconds of 1-shot training and scoring
#: on test seed 0; docs/results.md), used only to start the longest runs first
#: (the peers: their one-thread trainings at their own lengths, docs/results.md, plus scoring)
COST = {
    "dedn": 400,
    "object": 220,
    "scenario": 170,
    "pfenet": 1250,
    "hsnet": 6000,
    "bam": 2000,
    "hdmnet": 2400,
}


def cost(rows: list[str], shots: int) -> float:
    """Rough seconds of one invocation: its costliest row (a DEDN variant costs as much as DEDN)."""
    method = [next((m for m in COST if row.startswith(m)), None) for row in rows]
    return max(COST.get(m, 60) for m in method) * (3.0 if shots > 1 else 1.0)


def plan(root: Path, groups: list[str], folds: list[int], extra: list[str], config: str | None):
    """-> the run commands, the trained runs first and each kind longest first; and the collect command
    of each group."""
    runs, collects = [], []
    for group in groups:
        shots, flags, trained, free = GROUPS[group]
        out = root / group
        common = [
            sys.executable,
            str(TABLE),
            "--shots",
            str(shots),
            "--out",
            str(out),
            *flags,
            *(["--config", config] if config else []),
            *(a for s in extra for a in ("--set", s)),
        ]
        units = [([row], True) for row in trained] + ([(free, False)] if free else [])
        for fold in folds:
            for rows, is_trained in units:
                command = [*common, "--folds", str(fold), "--rows", *rows]
                runs.append((not is_trained, -cost(rows, shots), command))
        collects.append([*common, "--collect"])
    runs.sort(key=lambda r: r[:2])
    return [command for *_, command in runs], collects


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", nargs="+", choices=list(GROUPS), default=list(GROUPS))
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--root", default=str(REPO / "runs" / "pascal-all"))
    parser.add_argument("--config", help="the base config of every row (default: pascal_table's)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="override for every row")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args()
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")

    root = Path(args.root).resolve()
    runs, collects = plan(root, args.groups, args.folds, args.extra, args.config)
    if args.dry_run:
        for command in runs:
            print(shlex.join(command))
        for command in collects:
            print(shlex.join(command))
        return

    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    logs = root / "logs"
    logs.mkdir(exist_ok=True)

    def run(index: int, command: list[str]) -> tuple[list[str], int, float, Path]:
        log = logs / f"{index:03d}.log"
        start = time.perf_counter()
        with open(log, "w") as f:
            f.write(shlex.join(command) + "\n")
            f.flush()
            code = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        return command, code, time.perf_counter() - start, log

    failed = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run, i, command) for i, command in enumerate(runs)]
        for future in futures:
            command, code, seconds, log = future.result()
            what = " ".join(command[command.index("--folds") :])
            print(f"{'done' if code == 0 else 'FAILED'} in {seconds:.0f} s: {what} (log: {log})", flush=True)
            if code:
                failed.append(log)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed; see " + ", ".join(map(str, failed)))
    for command in collects:
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        print(f"table: {Path(command[command.index('--out') + 1]) / 'table.md'}")


if __name__ == "__main__":
    main()
