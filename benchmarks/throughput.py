"""Evaluation throughput with and without the feature cache, and one training step's time and memory.

Each setting runs in its own subprocess, so that the peak resident memory it reports is its own.
Figures are printed as a Markdown table; compare ratios within one run (this machine is shared and
noisy). Settings:

- ``lite0-417``: the offline default, EfficientNet-Lite0 with its ImageNet weights, 417 px;
- ``resnet50-473``: ResNet-50 (random weights, the papers' backbone and size), 473 px.

Evaluation episodes are real PASCAL-5i fold-0 episodes where ../shared/data is present (the image
recurrence that the cache exploits is then the real one), else the synthetic benchmark's.

    python benchmarks/throughput.py                      # everything (several minutes on 2 cores)
    python benchmarks/throughput.py --settings lite0-417 --episodes 100
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_PASCAL = (
    Path(os.environ.get("DEDN_SHARED_DATA", REPO.parent / "shared" / "data")) / "pascal-voc2012-val"
)

SETTINGS = {
    "lite0-417": [
        "model.backbone=efficientnet_lite0",
        "model.weights=imagenet",
        "data.image_size=417",
        "model.channels=64",
    ],
    "resnet50-473": [
        "model.backbone=resnet50",
        "model.weights=null",
        "data.image_size=473",
        "model.channels=256",
    ],
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(setting: str, shots: int, episodes: int, batch: int) -> dict:
    import torch

    from dedn.config import LossConfig, load_config
    from dedn.data.episodes import sample_test_episodes
    from dedn.engine.benchmark import build_benchmark
    from dedn.engine.evaluate import evaluate_episodes
    from dedn.engine.features import FeatureCache
    from dedn.losses import dedn_loss
    from dedn.models.network import FewShotSegmenter

    data = ["data.benchmark=synthetic"]
    if SHARED_PASCAL.is_dir():
        data = ["data.benchmark=pascal", f"data.root={SHARED_PASCAL}", "data.protocol=disjoint"]
    cfg = load_config(None, SETTINGS[setting] + data + [f"data.shots={shots}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench = build_benchmark(cfg.data)
    torch.manual_seed(0)
    model = FewShotSegmenter(cfg.model).to(device).eval()
    eps = sample_test_episodes(bench.split.test_pairs, episodes, shots, seed=0)
    unique = len({i for e in eps for i in (e.query, *e.supports)})
    result = {
        "setting": setting,
        "shots": shots,
        "episodes": episodes,
        "unique_images": unique,
        "data": cfg.data.benchmark,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    args = (model, bench.test_source, eps, bench.split.novel, cfg.data.image_size, device)
    # warm-up (CUDA context, cuDNN's algorithm choice, first allocations), outside both timings
    evaluate_episodes(
        model, bench.test_source, eps[:5], bench.split.novel, cfg.data.image_size, device, progress=False
    )
    sync()
    for name, cache in (("cached", FeatureCache()), ("uncached", None)):
        start = time.perf_counter()
        metric = evaluate_episodes(*args, cache=cache, progress=False)
        sync()
        result[f"eval_{name}_eps"] = episodes / (time.perf_counter() - start)
        result[f"miou_{name}"] = metric.compute()["miou"]
    # one training step on images (backbone forward + heads + backward) and on cached features
    s = cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    query = torch.rand(batch, 3, s, s, generator=g).to(device)
    supports = torch.rand(batch, shots, 3, s, s, generator=g).to(device)
    masks = (torch.rand(batch, shots, s, s, generator=g) > 0.5).long().to(device)
    target = (torch.rand(batch, s, s, generator=g) > 0.5).long().to(device)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    qf = model.encode(query)
    sf = {k: v.view(batch, shots, *v.shape[1:]) for k, v in model.encode(supports.flatten(0, 1)).items()}

    def step(inputs):
        out = model(*inputs)
        loss = dedn_loss(out, target, LossConfig(), model.expert_names)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    for name, inputs in (("images", (query, supports, masks)), ("features", (qf, sf, masks, (s, s)))):
        step(inputs)  # warm-up
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = peak_rss_mib()
        start = time.perf_counter()
        step(inputs)
        sync()
        if device.type == "cuda":
            result[f"train_{name}_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        else:
            result[f"train_{name}_peak_mib"] = peak_rss_mib()
            result[f"train_{name}_rss_growth_mib"] = peak_rss_mib() - before
        result[f"train_{name}_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--episodes", type=int, default=200, help="evaluation episodes (default 200)")
    parser.add_argument(
        "--resnet-episodes", type=int, default=30, help="episodes for ResNet-50 (slow on CPU)"
    )
    parser.add_argument("--batch", type=int, default=8, help="training batch size (default 8)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        setting, shots, episodes = args.one.split(",")
        print(json.dumps(run_one(setting, int(shots), int(episodes), args.batch)))
        return
    rows = []
    for setting in args.settings:
        for shots in args.shots:
            n = args.resnet_episodes if setting.startswith("resnet") else args.episodes
            env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
            proc = subprocess.run(
                [sys.executable, __file__, "--one", f"{setting},{shots},{n}", "--batch", str(args.batch)],
                env=env,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{setting} {shots}-shot failed")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{setting} {shots}-shot: {r['eval_cached_eps']:.2f} / {r['eval_uncached_eps']:.2f} ep/s",
                file=sys.stderr,
            )
    print(
        f"\ndata: {rows[0]['data']}, device: {rows[0]['device']}, torch threads: {rows[0]['threads']}, "
        f"training batch {args.batch}\n"
    )
    # the training step's peak: memory allocated on the GPU under CUDA, the process's resident set on a CPU
    memory = "peak GPU memory (MiB)" if rows[0]["device"].startswith("cuda") else "peak RSS (MiB)"
    print(
        "| setting | shots | episodes (unique images) | eval ep/s cached | eval ep/s uncached | speed-up | "
        f"train step on images (s) | {memory} | train step on cached features (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        assert r["miou_cached"] == r["miou_uncached"], "cached and uncached evaluation disagree"
        print(
            f"| {r['setting']} | {r['shots']} | {r['episodes']} ({r['unique_images']}) | "
            f"{r['eval_cached_eps']:.2f} | {r['eval_uncached_eps']:.2f} | "
            f"{r['eval_cached_eps'] / r['eval_uncached_eps']:.1f}x | {r['train_images_s']:.2f} | "
            f"{r['train_images_peak_mib']:.0f} | {r['train_features_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
