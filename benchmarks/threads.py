"""Seconds per query of `dedn predict`'s work (Predictor.predict with encoded supports) at several thread
counts, with the shipped model, timed interleaved query by query so that the machine's load falls on
every setting alike. Run it on an idle machine and on a busy one (e.g. beside a training): PyTorch's own
default (every core) is what `dedn predict --threads` replaces.

    python benchmarks/threads.py                     # 1 thread, the default of --threads, every core
    python benchmarks/threads.py --queries 20 --shots 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from dedn.cli import default_threads
from dedn.predict import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--shots", type=int, default=1)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    settings = sorted({1, default_threads(), cores})
    rng = np.random.default_rng(0)
    predictor = Predictor.from_pretrained(device="cpu")
    images = [rng.integers(0, 256, (375, 500, 3), dtype=np.uint8) for _ in range(args.shots + args.queries)]
    masks = [np.zeros((375, 500), np.uint8) for _ in range(args.shots)]
    for m in masks:
        m[100:250, 150:350] = 1
    supports = predictor.encode_supports(images[: args.shots], masks)
    predictor.predict(images[-1], supports)  # warm-up: the support-side work is done once
    times: dict[int, list[float]] = {n: [] for n in settings}
    for i, query in enumerate(images[args.shots :]):
        order = settings if i % 2 == 0 else settings[::-1]
        for n in order:
            torch.set_num_threads(n)
            start = time.perf_counter()
            predictor.predict(query, supports)
            times[n].append(time.perf_counter() - start)
    print(f"{cores} core(s) usable; {args.queries} queries of 500x375, {args.shots} shot(s), shipped model")
    for n in settings:
        tags = [
            t
            for t, v in (("1", 1), ("--threads default", default_threads()), ("every core", cores))
            if v == n
        ]
        print(
            f"  {n} thread(s) ({', '.join(tags)}): median {statistics.median(times[n]):.3f} s per query, "
            f"max {max(times[n]):.3f} s"
        )


if __name__ == "__main__":
    main()
