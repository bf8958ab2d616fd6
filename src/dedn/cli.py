"""The ``dedn`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dedn.errors import ConfigError, DednError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config", nargs="?", help="YAML config file (see configs/); default: the synthetic benchmark"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=500 (repeatable)",
    )
    p.add_argument("--output", help="output folder (default: the config's output_dir)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(args):
    from dedn.config import load_config
    from dedn.utils.io import check_dir

    cfg = load_config(args.config, args.overrides)
    if args.output:
        cfg.output_dir = args.output
    if args.func in (cmd_train, cmd_eval):
        # refuse an output folder that cannot exist before any work, not after an hour of it
        check_dir(cfg.output_dir)
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
        path = (
            Path(cfg.output_dir) / "checkpoints" / "last.pt" if args.resume == "auto" else Path(args.resume)
        )
        trainer.resume(path)
    summary = trainer.fit()
    if info.is_main:
        print(
            f"trained {summary['steps']} steps in {summary['seconds']:.1f} s; best validation mIoU "
            f"{100 * summary['best']['miou']:.1f} at step {summary['best']['step']}; "
            f"checkpoints in {Path(cfg.output_dir) / 'checkpoints'}"
        )
    return 0


def cmd_eval(args) -> int:
    from dedn.engine.checkpoint import load_trained_model
    from dedn.engine.evaluate import format_summary, run_evaluation

    cfg = _load(args)
    device, info = _setup(cfg)
    model, digest = load_trained_model(cfg, args.checkpoint, device)
    output = Path(cfg.output_dir)
    bench, recorder = None, None
    if args.save_vis:
        # the pictures need the images again: build the benchmark here and hand it to the evaluation
        from dedn.engine.benchmark import build_benchmark
        from dedn.vis import EpisodeRecorder

        bench = build_benchmark(cfg.data, progress=not args.quiet and info.is_main)
        if info.is_main:
            recorder = EpisodeRecorder(
                bench.test_source, cfg.data.image_size, args.save_vis, cfg.eval.seeds[0]
            )
    results = run_evaluation(
        cfg,
        model,
        device,
        output,
        Path(args.checkpoint) if args.checkpoint else None,
        digest,
        info,
        progress=not args.quiet,
        bench=bench,
        on_episode=recorder,
    )
    if info.is_main:
        print(format_summary(results))
        print(f"results: {output / 'results.json'} and {output / 'results.md'}")
        if recorder is not None:
            picture = recorder.write(output / "episodes.png")
            if picture is not None:
                print(f"episodes: {picture} ({len(recorder.rows)} of seed {recorder.seed})")
    return 0


_PREDICT_OUTPUTS = ("_mask.png", "_labels.png", "_overlay.jpg")


def default_threads() -> int:
    """Threads per process for `dedn predict` and `dedn app` when --threads is not given: half the cores
    this process may use (at least 1, at most 4). PyTorch's own default takes every core, which on a
    machine that runs anything else makes each query wait for the busiest core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def set_threads(threads: int | None) -> int:
    import torch

    n = default_threads() if threads is None else threads
    if n < 1:
        raise ConfigError(f"--threads {threads}: expected at least 1")
    torch.set_num_threads(n)
    return n


def _box_number(value: str, image: str) -> float:
    from dedn.errors import DataError

    try:
        return float(value)
    except ValueError:
        raise DataError(f"--support-box {image}: {value!r} is not a number (X0 Y0 X1 Y1 in pixels)") from None


def cmd_predict(args) -> int:
    from dedn.errors import DataError
    from dedn.predict import Predictor, find_images, predict_files
    from dedn.utils.io import check_dir

    set_threads(args.threads)
    if not 0.0 < args.threshold < 1.0:
        raise ConfigError(f"--threshold {args.threshold}: expected a probability strictly between 0 and 1")
    queries, ignored = find_images(args.query)
    out = check_dir(args.out, "--out folder").resolve()
    # with --out inside a query folder, a second run must not segment the first run's outputs
    queries = [q for q in queries if not (q.resolve().parent == out and q.name.endswith(_PREDICT_OUTPUTS))]
    if not queries:
        raise DataError(f"no image files found in {', '.join(args.query)}")
    groups = _support_groups(args.supports_in_order)
    predictor = _predictor(args)
    if args.method != "model":
        predictor = Predictor.training_free(args.method, predictor)
        print(f"dedn: method {args.method} (training-free; the backbone of the model above)", file=sys.stderr)
    predictor.box_refinement = args.box_refinement
    support_sets = {}
    for cls, items in groups.items():
        images, masks = [image for image, _ in items], [mask for _, mask in items]
        of = f" of class {cls}" if len(groups) > 1 else ""
        support_set = predictor.encode_supports(images, masks, mask_value=args.mask_value)
        if support_set.empty:
            raise DataError(f"the support masks{of} mark no object pixel (check --mask-value, or the masks)")
        for name, count in zip(support_set.names, support_set.foreground_pixels, strict=True):
            if count == 0:
                print(f"dedn: warning: the mask of support {name}{of} marks no object pixel", file=sys.stderr)
        support_sets[cls] = support_set
    if len(support_sets) > 1:
        legend = ", ".join(f"{k} {cls}" for k, cls in enumerate(support_sets, start=1))
        print(f"dedn: {len(support_sets)} classes, label values: 0 background, {legend}", file=sys.stderr)
    summary = predict_files(
        predictor,
        support_sets,
        queries,
        Path(args.out),
        progress=not args.quiet,
        ignored=ignored,
        threshold=args.threshold,
    )
    print(summary.format())
    print(f"masks and overlays in {args.out}")
    return 1 if summary.skipped else 0


class _InOrder(argparse.Action):
    """Keeps --class, --support and --support-box in the order given (``supports_in_order``), so that a
    --class applies to the supports after it."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, "supports_in_order", None) or [])
        items.append((self.dest, values))
        namespace.supports_in_order = items


def _support_groups(items) -> dict[str, list]:
    """(option, values) in command-line order -> {class name: [(image, mask or Box)]}: the supports after
    each --class NAME are that class's; without --class every support is one class, "object"."""
    from dedn.errors import DataError
    from dedn.weak import Box

    groups: dict[str, list] = {}
    current = None
    for option, values in items or []:
        if option == "class_name":
            if values in groups:
                raise DataError(f"--class {values} is given twice; give all its supports after one --class")
            current = values
            groups[current] = []
            continue
        if current is None:
            if any(option == "class_name" for option, _ in items):
                raise DataError("give --class NAME before the supports of that class")
            current = "object"
            groups[current] = []
        if option == "support":
            groups[current].append((values[0], values[1]))
        else:
            image, *corners = values
            groups[current].append((image, Box(*(_box_number(v, image) for v in corners))))
    if not groups:
        raise DataError("no support: give --support IMAGE MASK or --support-box IMAGE X0 Y0 X1 Y1")
    empty = [name for name, supports in groups.items() if not supports]
    if empty:
        raise DataError(f"--class {empty[0]} has no support after it (--support or --support-box)")
    return groups


def _predictor(args):
    """The model of ``--checkpoint``, or the shipped one (said on stderr) when none is given."""
    from dedn.predict import Predictor

    if args.checkpoint:
        return Predictor.from_checkpoint(args.checkpoint, device=args.device, image_size=args.size)
    predictor = Predictor.from_pretrained(device=args.device, image_size=args.size)
    print(
        f"dedn: using the shipped model {predictor.pretrained} (--checkpoint for your own)", file=sys.stderr
    )
    return predictor


def cmd_assemble(args) -> int:
    from dedn.engine.checkpoint import assemble_experts, save_checkpoint

    path = save_checkpoint(args.output, assemble_experts(args.object, args.scenario))
    print(
        f"DEDN made of {args.object} and {args.scenario}: {path}\n"
        "score it with --set model.method=dedn --set model.reduce=per_expert --set model.fusion.gate=false"
    )
    return 0


def cmd_export(args) -> int:
    from dedn.export import export_onnx
    from dedn.predict import Predictor

    test_time = {"model.fusion.matcher": args.matcher} if args.matcher else None
    predictor = Predictor.from_checkpoint(
        args.checkpoint, device="cpu", image_size=args.size, test_time=test_time
    )
    cfg = predictor.config
    report = export_onnx(
        predictor.model,
        args.out,
        args.shots,
        predictor.image_size,
        opset=args.opset,
        verify=not args.no_verify,
        metadata={
            "method": cfg.model.method,
            "backbone": cfg.model.backbone,
            "checkpoint": Path(args.checkpoint).name,
        },
    )
    print(
        f"wrote {report.path} ({report.shots}-shot, input {report.image_size} px) in {report.seconds:.1f} s"
    )
    if report.max_abs_diff is not None:
        print(
            f"checked with onnxruntime: max |probability difference| to PyTorch = {report.max_abs_diff:.2e}"
        )
    return 0


def cmd_app(args) -> int:
    from dedn.app import launch_app

    set_threads(args.threads)
    launch_app(args.checkpoint, host=args.host, port=args.port, device=args.device, image_size=args.size)
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
    print(
        f"wrote {len(episodes)} episodes ({bench.name} fold {bench.fold}, {cfg.data.shots}-shot, "
        f"seed {seed}) to {path or args.out}"
    )
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


def cmd_features(args) -> int:
    from dedn.engine.benchmark import build_benchmark
    from dedn.engine.distributed import resolve_device
    from dedn.engine.features import build_feature_store
    from dedn.models.network import FewShotSegmenter

    cfg = _load(args)
    device = resolve_device(cfg.device)
    bench = build_benchmark(cfg.data, progress=not args.quiet)
    model = FewShotSegmenter(cfg.model).to(device).eval()
    root = None if cfg.feature_store in (None, "auto") else cfg.feature_store
    sources = [bench.train_source]
    if bench.test_source is not bench.train_source:  # the standard protocol: two splits
        sources.append(bench.test_source)
    size, dtype = cfg.data.image_size, cfg.feature_store_dtype
    if args.dry_run:
        from dedn.engine.features import store_bytes_per_image

        per_image = store_bytes_per_image(model, size, dtype)
        print(f"{cfg.model.backbone} at {size} px, {dtype}: {per_image / 1e6:.2f} MB per image")
        for source in sources:
            print(f"{source.name}: {len(source)} images, {len(source) * per_image / 1e9:.2f} GB")
        print(f"COCO-20i (COCO 2014 train + val, 123,287 images): {123_287 * per_image / 1e9:.1f} GB")
        return 0
    for source in sources:
        start = time.perf_counter()
        store = build_feature_store(model, source, size, device, root, progress=not args.quiet, dtype=dtype)
        print(
            f"{source.name}: {len(store)} images in {store.folder} ({time.perf_counter() - start:.1f} s, "
            f"{store.bytes_per_image / 1e6:.2f} MB per image)"
        )
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
    p.add_argument(
        "--save-vis",
        type=int,
        default=0,
        metavar="N",
        help="draw the first N episodes of the first seed to <output>/episodes.png",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predict",
        help="segment your own images with a trained model",
        description="Segment, in each query image, the object marked on the support image(s). Exit status: "
        "0 all queries done, 1 some query files could not be read (named on stderr and in the "
        "summary; the others are done), 2 bad input (checkpoint, supports, options).",
    )
    p.add_argument("--checkpoint", help="trained weights (.pt; default: the shipped model)")
    p.add_argument(
        "--support",
        nargs=2,
        action=_InOrder,
        metavar=("IMAGE", "MASK"),
        help="a support image and its mask (repeat for K shots)",
    )
    p.add_argument(
        "--support-box",
        nargs=5,
        action=_InOrder,
        metavar=("IMAGE", "X0", "Y0", "X1", "Y1"),
        help="a support image and a box around the object instead of a mask: pixels from the top-left "
        "corner, x1 and y1 exclusive (repeatable, in any order with --support)",
    )
    p.add_argument(
        "--class",
        dest="class_name",
        action=_InOrder,
        metavar="NAME",
        help="several classes at once: the supports after --class NAME are that class's (repeat per "
        "class); writes <name>_labels.png, value k = the k-th class, 0 background",
    )
    p.add_argument(
        "--box-refinement",
        choices=["probe", "none"],
        default="probe",
        help="how a --support-box becomes the support's mask: probe (the part of the box that the "
        "picture's features separate from its outside; default) or none (the whole box)",
    )
    p.add_argument(
        "--query", nargs="+", required=True, metavar="PATH", help="query image(s) or folder(s) of images"
    )
    p.add_argument("--out", required=True, help="output folder for <name>_mask.png and <name>_overlay.jpg")
    p.add_argument("--mask-value", type=int, help="the object's value in the support masks (label maps)")
    p.add_argument("--size", type=int, help="network input size (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument(
        "--method",
        choices=["model", "proto", "prior"],
        default="model",
        help="model: the checkpoint's (or the shipped) model; proto, prior: the training-free matchers on "
        "its backbone (default: model)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="foreground probability above which a pixel is the object (default 0.5); queries with an "
        "empty mask are reported with their highest probability",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default: half the cores, 1 to 4; more can be much slower on a busy machine)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict, supports_in_order=[])

    # each expert keeps its own reduction layer, there is no fusion gate: score with AWF, cycle or mean
    p = sub.add_parser(
        "assemble", help="make a DEDN checkpoint of an object and a scenario model trained apart"
    )
    p.add_argument("--object", required=True, help="checkpoint of a model.method=object model")
    p.add_argument("--scenario", required=True, help="checkpoint of a model.method=scenario model")
    p.add_argument("--output", required=True, help="the DEDN checkpoint to write (.pt)")
    p.set_defaults(func=cmd_assemble)

    p = sub.add_parser("export", help="export a trained model to ONNX")
    p.add_argument("--checkpoint", required=True, help="trained weights (.pt)")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--shots", type=int, default=1, help="K, fixed in the exported graph (default: 1)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--size", type=int, help="input size S, fixed in the graph (default: the checkpoint's)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument(
        "--matcher",
        choices=["proto", "none"],
        help="DEDN: the AWF matcher in the graph instead of the checkpoint's (a probe matcher, which is "
        "fitted per support set, cannot be exported)",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("app", help="a local web page to try a trained model (needs dedn[app])")
    p.add_argument("--checkpoint", help="trained weights (.pt; default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860 or the next free one)")
    p.add_argument("--size", type=int, help="network input size (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="cpu, cuda ... (default: auto)")
    p.add_argument("--threads", type=int, help="CPU threads (default: half the cores, 1 to 4)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("episodes", help="write a test episode file from a seed")
    _config_args(p)
    p.add_argument("--seed", type=int, help="episode seed (default: the first of eval.seeds)")
    p.add_argument("--episodes", type=int, help="number of episodes (default: eval.episodes)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.set_defaults(func=cmd_episodes)

    p = sub.add_parser("index", help="scan a data set and print the fold's image and pair counts")
    _config_args(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "features",
        help="encode every image of the benchmark once into the on-disk feature store (feature_store)",
    )
    _config_args(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the store's size (per image, per set, COCO-20i); no encoding",
    )
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("demo", help="the end-to-end demo on the embedded synthetic benchmark")
    p.add_argument("--output", default="runs/demo", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo config's)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu (default: the README's figures were made there), cuda, cuda:1 or auto",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=lambda a: __import__("dedn.demo", fromlist=["main"]).main(a))
    return parser


def _close_process_group(wait: bool) -> None:
    """Leave a torchrun process group cleanly: a process that exits while its peers still talk to it
    dies in gloo's threads ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        _close_process_group(wait=True)
        return code
    except DednError as e:
        print(f"dedn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dedn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
