"""Scoring speed from the feature store: proto, each expert and DEDN at 1 and 5 shots, on the same episodes.

Prints, from one run (compare ratios within it: this machine is shared and noisy):

- episodes per second of ``proto``, the object and the scenario expert (each a model of its own), DEDN
  with plain averaging (both experts, no AWF support pass), DEDN as configured (AWF with the matcher),
  DEDN with AWF's ``support_pass=self`` (each support image scored once per class and reused) and DEDN
  fusing on the feature grid (``model.fusion.resolution=grid``), at 1 and 5 shots, and each one's time
  per episode as a multiple of ``proto``'s. The arms are timed interleaved, episode by episode, so that
  the machine's load falls on each alike; an untimed pass over the episodes first warms the store's
  pages. Support sets and support images recur more the more episodes are scored, so the AWF arms get
  faster per episode with ``--episodes`` (a test run has 1,000 per seed);
- the store's bytes per image (float32 and float16);
- ``dedn eval`` of ``proto`` under torchrun with 2 processes against 1 (wall time ratio), so that a
  user with more cores or GPUs sees how evaluation scales.

Scoring speed does not depend on the weights: every model here has freshly initialised heads (seed 0), so
no checkpoint is needed. The backbone is not run (features come from the store, built once if missing:
a few minutes for the offline PASCAL images). One thread per process.

    OMP_NUM_THREADS=1 python benchmarks/scoring.py --episodes 100
    OMP_NUM_THREADS=1 python benchmarks/scoring.py --shots 1 --no-torchrun
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pascal_offline.yaml"

#: the arms: name -> config overrides (on top of the config and data.shots)
ARMS = {
    "proto": ["model.method=proto"],
    "object": ["model.method=object"],
    "scenario": ["model.method=scenario"],
    "dedn (mean)": ["model.fusion.mode=mean", "model.fusion.matcher=none"],
    "dedn": [],
    "dedn (proto matcher)": ["model.fusion.matcher=proto", "model.fusion.confidence=true"],
    "dedn (self pass)": ["model.fusion.support_pass=self"],
    "dedn (grid)": ["model.fusion.resolution=grid"],
}


def time_arms(
    config: str, arms: list[str], episodes: int, shots: int, settings: dict[str, list[str]] | None = None
) -> dict[str, tuple[float, float]]:
    """{arm: (seconds per episode, mIoU)} on the first ``episodes`` test episodes of seed 0. ``settings``:
    each arm's config overrides (default :data:`ARMS`).

    The arms are timed interleaved: episode by episode, each arm in turn (the order rotating), so that a
    change in the machine's load during the run falls on every arm alike and the ratios stay fair. Each
    arm does what ``evaluate_episodes`` does per episode (the runner's pass, the metric's update), with its
    own runner, hence its own cache of AWF's support scores, as in a ``dedn eval`` run."""
    import torch

    from dedn.config import load_config
    from dedn.data.episodes import sample_test_episodes
    from dedn.engine.benchmark import build_benchmark
    from dedn.engine.evaluate import EpisodeRunner
    from dedn.engine.features import open_feature_store
    from dedn.metrics import FewShotIoU
    from dedn.models.network import FewShotSegmenter

    device = torch.device("cpu")
    runners, metrics = {}, {}
    for arm in arms:
        cfg = load_config(config, [*(settings or ARMS)[arm], f"data.shots={shots}"])
        bench = build_benchmark(cfg.data)
        torch.manual_seed(0)
        model = FewShotSegmenter(cfg.model).to(device).eval()
        store = open_feature_store(cfg, model, bench.test_source, device, progress=False)
        runners[arm] = EpisodeRunner(model, bench.test_source, cfg.data.image_size, device, store)
        metrics[arm] = FewShotIoU(bench.split.novel)
    eps = sample_test_episodes(bench.split.test_pairs, episodes, shots, seed=0)
    # untimed: every episode once through a runner of its own, so that no arm pays for the store's first
    # reads from disk (each arm's runner still decodes each label once, as a run does)
    warm = EpisodeRunner(runners[arms[0]].model, bench.test_source, cfg.data.image_size, device, store)
    with torch.no_grad():
        for episode in eps:
            warm.run(episode)
    seconds = dict.fromkeys(arms, 0.0)
    with torch.no_grad():
        for i, episode in enumerate(eps):
            for arm in arms[i % len(arms) :] + arms[: i % len(arms)]:
                start = time.perf_counter()
                prediction, target, _ = runners[arm].run(episode)
                metrics[arm].update(prediction, target, episode.class_id)
                seconds[arm] += time.perf_counter() - start
    return {arm: (seconds[arm] / episodes, metrics[arm].compute()["miou"]) for arm in arms}


def store_sizes(config: str) -> dict[str, int]:
    from dedn.config import load_config
    from dedn.engine.features import store_bytes_per_image
    from dedn.models.network import FewShotSegmenter

    cfg = load_config(config)
    model = FewShotSegmenter(cfg.model).eval()
    return {
        dtype: store_bytes_per_image(model, cfg.data.image_size, dtype) for dtype in ("float32", "float16")
    }


def torchrun_ratio(config: str, episodes: int) -> tuple[float, float]:
    """Wall seconds of `dedn eval` (proto, one seed) with 1 and with 2 processes."""
    times = []
    for procs in (1, 2):
        out = Path(tempfile.mkdtemp(prefix="dedn-bench-"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "dedn", "eval", config, "--quiet", "--output", str(out), "--set", "model.method=proto",
               "--set", f"eval.episodes={episodes}", "--set", "eval.seeds=[0]",
               "--set", f"eval.episode_dir={out / 'episodes'}"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=REPO)
        times.append(time.perf_counter() - start)
        shutil.rmtree(out, ignore_errors=True)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--episodes", type=int, default=100, help="episodes per arm (default 100)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--no-torchrun", action="store_true", help="skip the 2-process comparison")
    parser.add_argument("--torchrun-episodes", type=int, default=400)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(
        f"config {Path(args.config).name}, {args.episodes} episodes per arm (test seed 0, fold 0), 1 thread"
    )
    print("\n| shots | method | ms / episode | episodes / s | x proto | mIoU (untrained heads) |")
    print("|---|---|---|---|---|---|")
    for shots in args.shots:
        timed = time_arms(args.config, args.arms, args.episodes, shots)
        base = timed["proto"][0] if "proto" in timed else None
        for arm, (seconds, miou) in timed.items():
            ratio = f"{seconds / base:.2f}" if base else "-"
            row = [str(shots), arm, f"{1000 * seconds:.1f}", f"{1 / seconds:.1f}", ratio, f"{100 * miou:.1f}"]
            print("| " + " | ".join(row) + " |", flush=True)
    sizes = store_sizes(args.config)
    print("\nstore bytes per image: " + ", ".join(f"{k} {v:,} ({v / 1e6:.2f} MB)" for k, v in sizes.items()))
    if not args.no_torchrun:
        one, two = torchrun_ratio(args.config, args.torchrun_episodes)
        print(
            f"dedn eval (proto, {args.torchrun_episodes} episodes) under torchrun: 1 process {one:.1f} s, "
            f"2 processes {two:.1f} s, speed-up {one / two:.2f}x (process start-up included)"
        )


if __name__ == "__main__":
    main()
