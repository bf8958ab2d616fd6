"""The ``dedn`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dedn.errors import DednError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (see configs/); default: the synthetic benchmark")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=500 (repeatable)")
    p.add_argument("--output", help="output folder (default: the config's output_dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(args):
    from dedn.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.output:
        cfg.output_dir = args.output
    return cfg


def _setup(cfg):
    import torch

    from dedn.engine.distributed import init_distributed, resolve_device

    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, info


def cmd_train(args) -> int:
    from dedn.engine.train import Trainer

    cfg = _load(args)
    device, info = _setup(cfg)
    trainer = Trainer(cfg, Path(cfg.output_dir), device, info, progress=not args.quiet)
    if args.resume:
        path = Path(cfg.output_dir) / "checkpoints" / "last.pt" if args.resume == "auto" else Path(args.resume)
        trainer.resume(path)
    summary = trainer.fit()
    if info.is_main:
        print(f"trained {summary['steps']} steps in {summary['seconds']:.1f} s; best validation mIoU "
              f"{100 * summary['best']['miou']:.1f} at step {summary['best']['step']}; "
              f"checkpoints in {Path(cfg.output_dir) / 'checkpoints'}")
    return 0


def load_trained_model(cfg, checkpoint: str | None, device):
    """The model of ``cfg`` with the weights of ``checkpoint`` (checked to be the same configuration)."""
    from dedn.engine.checkpoint import (
        check_compatible,
        checkpoint_config,
        file_sha256,
        load_checkpoint,
        load_model_state,
    )
    from dedn.errors import CheckpointError
    from dedn.models.network import FewShotSegmenter

    model = FewShotSegmenter(cfg.model)
    digest = None
    if checkpoint:
        if not model.trainable:
            raise CheckpointError(f"model.method = {cfg.model.method} is training-free and takes no checkpoint")
        state = load_checkpoint(checkpoint)
        check_compatible(checkpoint_config(state, checkpoint), cfg, checkpoint)
        load_model_state(model, state["model"], checkpoint)
        digest = file_sha256(checkpoint)
    elif model.trainable:
        raise CheckpointError(f"model.method = {cfg.model.method} must be trained: pass --checkpoint")
    return model.to(device).eval(), digest


def cmd_eval(args) -> int:
    from dedn.engine.evaluate import format_summary, run_evaluation

    cfg = _load(args)
    device, info = _setup(cfg)
    model, digest = load_trained_model(cfg, args.checkpoint, device)
    output = Path(cfg.output_dir)
    results = run_evaluation(cfg, model, device, output, Path(args.checkpoint) if args.checkpoint else None,
                             digest, info, progress=not args.quiet)
    if info.is_main:
        print(format_summary(results))
        print(f"results: {output / 'results.json'} and {output / 'results.md'}")
    return 0


def cmd_episodes(args) -> int:
    from dedn.data.episodes import sample_test_episodes, write_episodes
    from dedn.engine.benchmark import build_benchmark

    cfg = _load(args)
    bench = build_benchmark(cfg.data, progress=not args.quiet)
    n = args.episodes or cfg.eval.episodes
    seed = cfg.eval.seeds[0] if args.seed is None else args.seed
    episodes = sample_test_episodes(bench.split.test_pairs, n, cfg.data.shots, seed)
    path = write_episodes(args.out, episodes, bench.episode_meta(shots=cfg.data.shots, seed=seed, n=n))
    print(f"wrote {len(episodes)} episodes ({bench.name} fold {bench.fold}, {cfg.data.shots}-shot, seed {seed}) "
          f"to {path or args.out}")
    return 0


def cmd_index(args) -> int:
    from dedn.engine.benchmark import build_benchmark

    cfg = _load(args)
    start = time.perf_counter()
    bench = build_benchmark(cfg.data, progress=not args.quiet)
    elapsed = time.perf_counter() - start
    print(f"{bench.name} fold {bench.fold} ({bench.split.protocol}): {bench.split.summary()}")
    print(f"novel classes: {bench.split.novel}; built in {elapsed:.2f} s (label scans are cached)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dedn import __version__

    parser = argparse.ArgumentParser(prog="dedn", description="Few-shot segmentation with DEDN and baselines")
    parser.add_argument("--version", action="version", version=f"dedn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model episodically")
    _config_args(p)
    p.add_argument("--resume", metavar="CKPT", help="continue a run from a checkpoint ('auto': last.pt)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate on test episodes (mean +- std over seeds)")
    _config_args(p)
    p.add_argument("--checkpoint", help="trained weights (not needed for proto / prior)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("episodes", help="write a test episode file from a seed")
    _config_args(p)
    p.add_argument("--seed", type=int, help="episode seed (default: the first of eval.seeds)")
    p.add_argument("--episodes", type=int, help="number of episodes (default: eval.episodes)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(func=cmd_episodes)

    p = sub.add_parser("index", help="scan a data set and print the fold's image and pair counts")
    _config_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("demo", help="the end-to-end demo on the embedded synthetic benchmark")
    p.add_argument("--output", default="runs/demo", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo config's)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=lambda a: __import__("dedn.demo", fromlist=["main"]).main(a))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DednError as e:
        print(f"dedn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dedn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
