"""Efficiency of DEDN and the peer methods in one harness: parameters, training step, scoring, memory.

For each method (default: proto, dedn, pfenet, hsnet, bam, hdmnet), with the settings of a config
(default the offline PASCAL-5i table's, where only ``model.method`` differs between the methods), from
one run:

- trainable parameters (the heads: the frozen backbone is shared and not counted);
- seconds per training step on stored-feature inputs (batch and loss size of the config; the heads'
  forward, loss, backward and SGD step, as ``benchmarks/train_step.py`` times them), and that times the
  method's training length as the heads' share of one fold's training: with ``--lengths own`` (the
  default with the default ``--config``) the ``train.steps`` of the method's own config
  (``configs/<method>_offline.yaml``, where its length was chosen, e.g. PFENet's 3,250 steps; DEDN's is
  ``--config``), with ``--lengths config`` that of ``--config`` (and its ``--set``) for every method;
- milliseconds per test episode from the feature store at 1 and 5 shots (the first ``--episodes`` test
  episodes of fold 0, seed 0, the same for every method; as ``benchmarks/scoring.py`` times them);
- the peak resident memory of each of those measurements, each run in a fresh process (so that one
  method's peak is not another's). It includes the Python interpreter, torch and the pages of the
  memory-mapped store that the process touched.

Heads are freshly initialised (speed and memory do not depend on the weights). One thread per process.
Compare within one run: the machine is shared and noisy.

    OMP_NUM_THREADS=1 python benchmarks/peers.py --episodes 60
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pascal_offline.yaml"
METHODS = ["proto", "dedn", "pfenet", "hsnet", "bam", "hdmnet"]


def child(kind: str, method: str, shots: int, args) -> dict:
    """One measurement in this process; returns its figures and this process's peak memory."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "benchmarks"))
    out: dict = {}
    if kind == "score":
        from scoring import time_arms

        settings = {method: [f"model.method={method}", *args.overrides]}
        seconds, _ = time_arms(args.config, [method], args.episodes, shots, settings)[method]
        out["ms_per_episode"] = 1000 * seconds
    else:
        from train_step import time_method

        from dedn.config import load_config
        from dedn.models.network import FewShotSegmenter

        cfg = load_config(args.config, [f"model.method={method}", *args.overrides])
        model = FewShotSegmenter(cfg.model)
        out["parameters"] = sum(
            p.numel()
            for n, p in model.named_parameters()
            if p.requires_grad and not n.startswith("backbone.")
        )
        if model.trainable:
            step_args = argparse.Namespace(
                config=args.config, overrides=list(args.overrides), shots=shots, steps=args.steps
            )
            per_step, settings = time_method(method, step_args)
            out.update(s_per_step=per_step, train_steps=settings["train_steps"])
    # ru_maxrss is in KiB on Linux
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def own_steps(method: str, args) -> tuple[int, str]:
    """A method's training length and the config it comes from (``--lengths``)."""
    from dedn.config import load_config

    own = REPO / "configs" / f"{method}_offline.yaml"
    if args.lengths == "own" and own.exists():
        return load_config(own, []).train.steps, own.name
    return load_config(args.config, list(getattr(args, "overrides", []))).train.steps, Path(args.config).name


def run_child(kind: str, method: str, shots: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, method, str(shots), "--config", args.config,
           "--episodes", str(args.episodes), "--steps", str(args.steps)]  # fmt: skip
    cmd += [a for setting in args.overrides for a in ("--set", setting)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=REPO)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--episodes", type=int, default=60, help="test episodes per method and shot count")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per method (1 shot)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument(
        "--lengths",
        choices=("own", "config"),
        help="the training length each step time is multiplied by: the method's own config's (the default "
        "with the default --config), or --config's (the default with any other)",
    )
    parser.add_argument("--child", nargs=3, metavar=("KIND", "METHOD", "SHOTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lengths is None:
        args.lengths = "own" if Path(args.config).resolve() == CONFIG.resolve() else "config"
    if args.child:
        kind, method, shots = args.child
        print(json.dumps(child(kind, method, int(shots), args)))
        return
    print(f"config {Path(args.config).name}; {args.episodes} test episodes (fold 0, seed 0) per method and "
          f"shot count; {args.steps} timed 1-shot training steps; 1 thread; heads untrained\n")  # fmt: skip
    print("| method | trainable parameters | s / training step (x steps = s, from) | ms / episode, 1 shot | "
          "ms / episode, 5 shots | peak memory (MB): training step / 1 / 5 shots |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        train = run_child("train", method, 1, args)
        one = run_child("score", method, 1, args)
        five = run_child("score", method, 5, args)
        step = "- (training-free)"
        if "s_per_step" in train:
            steps, source = own_steps(method, args)
            total = train["s_per_step"] * steps
            step = f"{train['s_per_step']:.3f} (x {steps} = {total:.0f} s, {source})"
        peaks = " / ".join(f"{r['peak_mb']:.0f}" for r in (train, one, five))
        row = [method, f"{train['parameters']:,}", step, f"{one['ms_per_episode']:.1f}",
               f"{five['ms_per_episode']:.1f}", peaks]  # fmt: skip
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
