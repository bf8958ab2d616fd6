"""Run the offline PASCAL-5i table: methods x folds x shots (and the ablations), then collect it.

Every row is ``configs/pascal_offline.yaml`` plus the overrides printed next to it; a peer method's row
(PFENet, HSNet, BAM, HDMNet) is trained with its own recipe and length, i.e. every setting in which its own
config (``configs/<method>_offline.yaml``) differs from the table config (``--recipe own``, the default
with the default ``--config``; ``--recipe config`` gives every row the table config's). A trained row is
trained once per fold with ``dedn train`` (1-shot episodes) and that model is scored with ``dedn eval`` at
every shot count, on the same episode files as every other row (one per fold, shot count and seed).
With ``--train-shots test`` a model is trained per shot count instead, on episodes with that many
supports (as PFENet and BAM train their 5-shot models); one ``--out`` holds models trained one way only.
A test-time ablation (plain averaging instead of AWF) scores the DEDN model of its fold with another
fusion; it needs no training of its own. The "trained apart" rows assemble the fold's ``object`` and
``scenario`` models into one DEDN (``dedn assemble``) and score it; no training of their own either.
Wall times are recorded per run. Results are collected into
``<out>/table.md`` and ``<out>/table.json``; ``table.md`` also lists, for every row with a two-expert
model, each expert and each other fusion of that model scored from the same forward pass (``dedn eval``
scores them all). A run whose output already exists is not repeated (a trained model is reused only
if it was trained with the settings its row resolves to now; otherwise the script stops and says how
they differ), so several invocations (e.g. one per fold, in parallel) can share ``--out``.

    python scripts/pascal_table.py --folds 0 --shots 1                 # one fold, 1-shot, main methods
    python scripts/pascal_table.py --folds 0 1 2 3 --shots 1 5         # the main table
    python scripts/pascal_table.py --folds 0 1 2 3 --shots 1 --ablations
    python scripts/pascal_table.py --shots 5 --train-shots test --out runs/pascal-table-5shot  # 5-shot models
    python scripts/pascal_table.py --collect                           # only rebuild table.md
    python scripts/pascal_table.py --methods pfenet --length pseudo-novel   # each method's own length

With ``--length pseudo-novel`` every trained row first chooses its own training length (issue 40): its
model is trained on fold 0 with ``--length-classes`` (base classes) held out of training, for at most
``--length-cap`` steps, validated every ``--length-every`` steps on episodes of the held-out classes
(``data.val_classes``), so on classes it never saw, as the test is. The step of the best validation
mIoU (the earliest of ties) becomes the row's ``train.steps`` on every fold, with one validation at
its end (so ``best.pt`` is the last step's model, not a checkpoint chosen on base classes). The
choices are written to ``<out>/lengths.json`` with each validation curve. ``--search-only`` stops there
(a search of another setting, e.g. a learning rate, compared on the same held-out classes):

    python scripts/pascal_table.py --methods bam --length pseudo-novel --search-only \
        --out runs/lr-sweep/bam-lr0.04 --set train.lr=0.04
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from dedn.config import ConfigError, flatten, load_config, to_dict
from dedn.utils.io import atomic_write_json, atomic_write_text
from dedn.vis import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "pascal_offline.yaml"
#: by default every trained model is trained on 1-shot episodes and scored at 1 and 5 shots;
#: ``--train-shots test`` trains one model per shot count instead (as PFENet and BAM do)
TRAIN_SHOTS = 1


class Row:
    """A table row: the model it trains (``train``: overrides; None = training-free) and the test-time
    overrides it is scored with (``test``)."""

    def __init__(self, train: list[str] | None, test: list[str] | None = None):
        self.train = train
        self.test = test or []


class Apart(Row):
    """A DEDN assembled (``dedn assemble``) from the fold's ``object`` and ``scenario`` models, which were
    trained apart: no distillation, no fused loss, no shared layer. Scored with ``fusion`` (awf | mean)."""

    #: the experts' rows, whose trained models are reused
    PARTS = {"object": ["model.method=object"], "scenario": ["model.method=scenario"]}

    def __init__(self, fusion: str):
        super().__init__(
            None,
            [
                "model.method=dedn",
                "model.reduce=per_expert",
                "model.fusion.gate=false",
                f"model.fusion.mode={fusion}",
            ],
        )


METHODS = {
    "dedn": Row(["model.method=dedn"]),
    "object": Row(["model.method=object"]),
    "scenario": Row(["model.method=scenario"]),
    "proto": Row(None, ["model.method=proto"]),
    "prior": Row(None, ["model.method=prior"]),
    # peer methods trained and scored in the same harness: on the same frozen features, with DEDN's
    # training budget (docs/method.md, "Peers in the same harness"); BAM also trains its base learner first
    "pfenet": Row(["model.method=pfenet"]),
    "hsnet": Row(["model.method=hsnet"]),
    "bam": Row(["model.method=bam"]),
    "hdmnet": Row(["model.method=hdmnet"]),
}
ABLATIONS = {
    "dedn w/o Scenario Normalization": Row(["model.method=dedn", "model.scenario.normalization=none"]),
    "dedn w/o Object Continuity Guidance": Row(["model.method=dedn", "model.object.ocg.enabled=false"]),
    "dedn w/o contrastive term": Row(["model.method=dedn", "loss.contrast.weight=0"]),
    "dedn w/o positive-guided KL": Row(["model.method=dedn", "loss.distill.mode=off"]),
    "dedn w/o fused CE": Row(["model.method=dedn", "loss.fused_ce=0"]),
    # the experts are then trained by their own losses only, coupled through the shared reduction layer
    "dedn w/o KL and fused CE": Row(["model.method=dedn", "loss.distill.mode=off", "loss.fused_ce=0"]),
    "dedn, one reduction layer per expert": Row(["model.method=dedn", "model.reduce=per_expert"]),
    # test-time: the DEDN model of the fold, fused by plain averaging
    "dedn, plain averaging instead of AWF": Row(["model.method=dedn"], ["model.fusion.mode=mean"]),
    "dedn, learned fusion gate instead of AWF": Row(["model.method=dedn"], ["model.fusion.mode=gate"]),
    # the experts trained apart (the object and scenario rows' models), fused at test time only; its
    # evaluation also scores plain averaging and each expert from the same pass
    "dedn of experts trained apart, AWF": Apart("awf"),
    # the two readings of "positive-guided", each named whatever the default is
    "dedn, PKL correct-teacher": Row(["model.method=dedn", "loss.distill.mode=correct"]),
    "dedn, PKL foreground-only": Row(["model.method=dedn", "loss.distill.mode=foreground"]),
    # the earlier design: both heads also see the query's own features (PFENet's layout)
    "dedn, heads also see the query features": Row(["model.method=dedn", "model.head_inputs=features"]),
    "object, head also sees the query features": Row(["model.method=object", "model.head_inputs=features"]),
    "scenario, head also sees the query features": Row(
        ["model.method=scenario", "model.head_inputs=features"]
    ),
}
ROWS = {**METHODS, **ABLATIONS}
#: the peers' own configs (issue 40): each holds the recipe and length chosen for its method
OWN_CONFIGS = {m: REPO / "configs" / f"{m}_offline.yaml" for m in ("pfenet", "hsnet", "bam", "hdmnet")}


def override(key: str, value) -> str:
    """``key=value`` as ``--set`` reads it back (text as is, anything else as YAML/JSON)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def recipe(name: str) -> list[str]:
    """The overrides that turn the table config into the row's own config (``OWN_CONFIGS``): every
    setting the two resolve differently, but the run's name and folder. Empty for a row without one."""
    own = OWN_CONFIGS.get(name)
    if own is None:
        return []
    try:
        base, mine = (flatten(to_dict(load_config(path))) for path in (CONFIG, own))
    except ConfigError as e:
        raise SystemExit(f"{own}: cannot read the row's own config ({e})") from None
    return [override(k, v) for k, v in mine.items() if k not in ("name", "output_dir") and base.get(k) != v]


def slug(parts: list[str]) -> str:
    text = "_".join(parts).lower()
    return "".join(c if c.isalnum() or c in "._=" else "-" for c in text).replace("model.", "")


def dedn(*args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dedn.cli", *args], cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"dedn {args[0]} failed (exit status {done.returncode}), see its message above")
    return time.perf_counter() - start


def flags(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


#: settings that do not change a trained model (dotted keys, or prefixes ending in a dot)
NOT_TRAINED = ("name", "output_dir", "device", "eval.")


def changed_settings(run: Path, sets: list[str], config: Path) -> list[str]:
    """How the model trained in ``run`` differs from ``config`` + ``sets`` as resolved today (say, after a
    default changed): one ``key: trained -> asked`` line per setting; empty when it is the same model."""
    try:
        trained = flatten(to_dict(load_config(run / "config.yaml")))
        asked = flatten(to_dict(load_config(config, sets)))
    except ConfigError as e:
        raise SystemExit(f"{run}: cannot compare the trained model with its row ({e})") from None
    keys = sorted(k for k in trained.keys() | asked.keys() if not k.startswith(NOT_TRAINED))
    return [f"{k}: {trained.get(k)} -> {asked.get(k)}" for k in keys if trained.get(k) != asked.get(k)]


def trained_on(shots: int) -> str:
    """The model folder's suffix for models trained on ``shots``-shot episodes (none for the default)."""
    return "" if shots == TRAIN_SHOTS else f"-train{shots}shot"


def train_model(
    overrides: list[str],
    fold: int,
    out: Path,
    extra: list[str],
    config: Path = CONFIG,
    shots: int = TRAIN_SHOTS,
) -> tuple[Path, float | None]:
    """Train (once) the model of ``overrides`` on ``fold`` with ``shots``-shot episodes: -> its best
    checkpoint, training seconds (validation then also uses ``shots`` supports).

    A model trained earlier is reused only if it was trained with the settings the row resolves to now.
    """
    run = out / "models" / f"{slug(overrides)}-fold{fold}{trained_on(shots)}"
    times = run / "times.json"
    sets = [*overrides, f"data.fold={fold}", f"data.shots={shots}", *extra]
    if times.exists():
        changed = changed_settings(run, sets, config)
        if changed:
            raise SystemExit(
                f"{run} was trained with other settings than this row asks for now:\n  "
                + "\n  ".join(changed)
                + "\nMove that folder away to train the row again, or use another --out."
            )
    else:
        # a training stopped part-way (its times.json is written only at the end) goes on from its last
        # checkpoint; its seconds are then those of the resumed part only
        last = run / "checkpoints" / "last.pt"
        resume = ["--resume", str(last)] if last.exists() else []
        seconds = dedn("train", str(config), "--quiet", "--output", str(run), *resume, *flags(sets))
        atomic_write_json(times, {"train_seconds": seconds, "overrides": sets, "resumed": bool(resume)})
    return run / "checkpoints" / "best.pt", json.loads(times.read_text())["train_seconds"]


def assemble_model(
    fold: int, out: Path, extra: list[str], config: Path = CONFIG, shots: int = TRAIN_SHOTS
) -> Path:
    """The DEDN of the fold's object and scenario models trained apart (each trained if needed)."""
    parts = {name: train_model(sets, fold, out, extra, config, shots) for name, sets in Apart.PARTS.items()}
    run = out / "models" / f"apart-fold{fold}{trained_on(shots)}"
    ckpt = run / "checkpoints" / "best.pt"
    times = run / "times.json"
    if not times.exists():
        dedn(
            "assemble",
            "--object",
            str(parts["object"][0]),
            "--scenario",
            str(parts["scenario"][0]),
            "--output",
            str(ckpt),
        )
        record = {
            "train_seconds": sum(seconds for _, seconds in parts.values()),
            "overrides": [f"assembled from {path}" for path, _ in parts.values()],
        }
        atomic_write_json(times, record)
    return ckpt


#: base classes of fold 0 held out of training to choose a method's length (``--length pseudo-novel``):
#: car, cow, dog, sofa, one or two from each of the other folds' class groups
LENGTH_CLASSES = [7, 10, 12, 18]
#: what ``--length pseudo-novel`` sets (an extra ``--set`` of them is refused)
LENGTH_SETTINGS = ("train.steps", "train.val_every", "data.val_classes")


def validation_curve(run: Path) -> dict[int, float]:
    """step -> validation mIoU of a training run (``read_metrics``: resumed runs merged)."""
    curve = dict(zip(*read_metrics(run / "metrics.jsonl").get("val/miou", ([], [])), strict=True))
    if not curve:
        raise SystemExit(f"{run / 'metrics.jsonl'}: no validation was logged; cannot choose a length")
    return curve


def search_settings(
    row: Row, config: Path, extra: list[str], classes: list[int], cap: int, every: int
) -> list[str]:
    """The overrides of a row's length search: ``classes`` held out, ``cap`` steps, validation every
    ``every``; a method that sizes a layer by the number of base classes (BAM's base learner) gets the
    number left after the hold-out."""
    held = ",".join(str(c) for c in classes)
    sets = [f"data.val_classes=[{held}]", f"train.steps={cap}", f"train.val_every={every}"]
    cfg = load_config(config, [*(row.train or []), *extra])
    if cfg.model.method == "bam":
        sets.append(f"model.bam.base_classes={cfg.model.bam.base_classes - len(set(classes))}")
    return sets


def choose_length(
    name: str,
    row: Row,
    out: Path,
    extra: list[str],
    config: Path,
    classes: list[int],
    cap: int,
    every: int,
) -> int:
    """The row's training length chosen on pseudo-novel validation (fold 0, ``classes`` held out of
    training, validated every ``every`` steps up to ``cap``): the step of the best validation mIoU."""
    sets = [*(row.train or []), *search_settings(row, config, extra, classes, cap, every)]
    ckpt, seconds = train_model(sets, 0, out / "length", extra, config)
    curve = validation_curve(ckpt.parents[1])
    step = max(curve, key=lambda s: (curve[s], -s))
    lengths = out / "lengths.json"
    chosen = json.loads(lengths.read_text()) if lengths.exists() else {}
    chosen[name] = {
        "steps": step,
        "val_miou": curve[step],
        "held_out_classes": classes,
        "cap": cap,
        "every": every,
        "train_seconds": seconds,
        "curve": {str(s): v for s, v in sorted(curve.items())},
    }
    atomic_write_json(lengths, chosen)
    return step


def row_extra(name: str, own: bool, extra: list[str], search: bool) -> list[str]:
    """The settings a row gets beyond its own overrides: its method's recipe (``own``; without its length
    when the length is searched for), then every ``--set``."""
    mine = recipe(name) if own else []
    if search:
        mine = [s for s in mine if s.split("=", 1)[0] not in LENGTH_SETTINGS]
    return [*mine, *extra]


def with_length(row: Row, steps: int) -> Row:
    """``row`` trained for ``steps`` steps, validated once, at the end."""
    return Row([*(row.train or []), f"train.steps={steps}", f"train.val_every={steps}"], row.test)


def eval_dir(out: Path, name: str, fold: int, shots: int) -> Path:
    return out / "eval" / f"{slug([name])}-fold{fold}-{shots}shot"


def run_row(
    name: str,
    row: Row,
    fold: int,
    shots: int,
    out: Path,
    extra: list[str],
    config: Path = CONFIG,
    train_shots: int = TRAIN_SHOTS,
) -> dict:
    """Train the row's model (on ``train_shots``-shot episodes) if needed, score it on the fold's
    ``shots``-shot episodes if needed; -> its record."""
    checkpoint: list[str] = []
    sets = [*(row.train or []), *row.test, f"data.fold={fold}", f"data.shots={shots}", *extra]
    if row.train is not None:
        ckpt, _ = train_model(row.train, fold, out, extra, config, train_shots)
        checkpoint = ["--checkpoint", str(ckpt)]
    elif isinstance(row, Apart):
        checkpoint = ["--checkpoint", str(assemble_model(fold, out, extra, config, train_shots))]
    run = eval_dir(out, name, fold, shots)
    if not (run / "times.json").exists():
        eval_sets = [*sets, f"eval.episode_dir={out / 'episodes'}"]
        seconds = dedn("eval", str(config), "--quiet", "--output", str(run), *checkpoint, *flags(eval_sets))
        atomic_write_json(run / "times.json", {"eval_seconds": seconds, "overrides": sets})
    return read_record(name, fold, shots, out)


def read_record(name: str, fold: int, shots: int, out: Path) -> dict:
    """A finished row: its scores, settings, overrides and wall times (training and evaluation)."""
    run = eval_dir(out, name, fold, shots)
    times = json.loads((run / "times.json").read_text())
    results = json.loads((run / "results.json").read_text())
    record = {"row": name, "fold": fold, "shots": shots, "overrides": times["overrides"]}
    checkpoint = results["settings"]["checkpoint"]
    if checkpoint:
        model = Path(checkpoint).parents[1]
        record["checkpoint"] = checkpoint
        record["train_seconds"] = json.loads((model / "times.json").read_text())["train_seconds"]
    record["eval_seconds"] = times["eval_seconds"]
    record["miou"] = results["summary"]["miou"]
    record["fbiou"] = results["summary"]["fbiou"]
    record["settings"] = results["settings"]
    # a DEDN's experts and its other fusions, scored alone from the same forward pass
    record["parts"] = {name: part["miou"] for name, part in results.get("experts", {}).items()}
    return record


def collect(out: Path) -> list[dict]:
    """Every finished run under ``out``, in table order."""
    return [
        read_record(name, fold, shots, out)
        for shots in range(1, 11)
        for fold in range(4)
        for name in ROWS
        if (eval_dir(out, name, fold, shots) / "times.json").exists()
    ]


def cell(score: dict) -> str:
    """mIoU cell: mean +- std over the seeds, or the single seed's value marked ``(1 seed)``."""
    if score.get("n", 0) > 1:
        return f"{100 * score['mean']:.1f} +- {100 * score['std']:.1f}"
    return f"{100 * score['mean']:.1f} (1 seed)"


def fold_cells(scores: list[dict | None]) -> tuple[list[str], str]:
    """One score (or None: not run) per fold -> the cells and the mean over the folds ("-" unless all ran)."""
    cells = ["-" if s is None else cell(s) for s in scores]
    ran = [s["mean"] for s in scores if s is not None]
    return cells, f"{100 * sum(ran) / len(ran):.1f}" if ran and len(ran) == len(scores) else "-"


def table(records: list[dict]) -> str:
    folds = sorted({r["fold"] for r in records})
    lines = []
    for shots in sorted({r["shots"] for r in records}):
        lines += [
            f"### {shots}-shot (mIoU %, mean +- std over the test seeds; FB-IoU of the fold mean)",
            "",
            "| method | " + " | ".join(f"fold {f}" for f in folds) + " | mean mIoU | mean FB-IoU |",
            "|---|" + "---|" * (len(folds) + 2),
        ]
        for row in dict.fromkeys(r["row"] for r in records if r["shots"] == shots):
            found = [
                next((r for r in records if r["row"] == row and r["fold"] == f and r["shots"] == shots), None)
                for f in folds
            ]
            cells, mean = fold_cells([r and r["miou"] for r in found])
            _, fb = fold_cells([r and r["fbiou"] for r in found])
            lines.append(f"| {row} | " + " | ".join(cells) + f" | {mean} | {fb} |")
        lines.append("")
    lines += parts_table(records, folds)
    lines += [
        "### Wall time per fold (s; training once per fold, evaluation per shot count)",
        "",
        "| method | shots | " + " | ".join(f"fold {f}" for f in folds) + " |",
        "|---|---|" + "---|" * len(folds),
    ]
    for shots in sorted({r["shots"] for r in records}):
        for row in dict.fromkeys(r["row"] for r in records if r["shots"] == shots):
            cells = []
            for f in folds:
                r = next(
                    (r for r in records if r["row"] == row and r["fold"] == f and r["shots"] == shots), None
                )
                if r is None:
                    cells.append("-")
                elif (ROWS[row].test and ROWS[row].train is not None) or isinstance(ROWS[row], Apart):
                    cells.append(f"eval {r['eval_seconds']:.0f} (the models of other rows)")
                elif r.get("train_seconds") is not None:
                    cells.append(f"train {r['train_seconds']:.0f}, eval {r['eval_seconds']:.0f}")
                else:
                    cells.append(f"eval {r['eval_seconds']:.0f}")
            lines.append(f"| {row} | {shots} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def part_label(name: str) -> str:
    """``object`` -> its object expert alone; ``fusion=mean`` -> fused by mean (``dedn eval``'s names)."""
    if name.startswith("fusion="):
        return f"fused by {name.split('=', 1)[1]}"
    return f"its {name} expert alone"


def parts_table(records: list[dict], folds: list[int]) -> list[str]:
    """The rows with a two-expert model: each expert and each other fusion of that model, scored alone
    from the same forward pass (``dedn eval`` scores them all), next to the row's own output."""
    lines = []
    for shots in sorted({r["shots"] for r in records}):
        found = [r for r in records if r["shots"] == shots]
        rows = list(dict.fromkeys(r["row"] for r in found if r.get("parts")))
        if not rows:
            continue
        lines += [
            f"### {shots}-shot: each model's experts and fusions, scored from the same pass (mIoU %)",
            "",
            "| method | scored as | " + " | ".join(f"fold {f}" for f in folds) + " | mean |",
            "|---|---|" + "---|" * (len(folds) + 1),
        ]
        for row in rows:
            mine = [r for r in found if r["row"] == row]
            names = ["the row's output", *dict.fromkeys(n for r in mine for n in r.get("parts", {}))]
            for name in names:
                label = name if name == names[0] else part_label(name)
                scores = []
                for f in folds:
                    r = next((r for r in mine if r["fold"] == f), None)
                    scores.append(
                        None if r is None else r["miou"] if name == names[0] else r["parts"].get(name)
                    )
                cells, mean = fold_cells(scores)
                lines.append(f"| {row} | {label} | " + " | ".join(cells) + f" | {mean} |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ablations", action="store_true", help="the ablation rows instead of the methods")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="these rows (instead of the above)")
    parser.add_argument("--collect", action="store_true", help="only collect the finished runs")
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], help="extra override for every row"
    )
    parser.add_argument("--out", default=str(REPO / "runs" / "pascal-table"))
    parser.add_argument("--config", default=str(CONFIG), help="the base config of every row")
    parser.add_argument(
        "--recipe",
        choices=["own", "config"],
        help="a peer's row: with the settings of its own config (configs/<method>_offline.yaml: its recipe "
        "and length; the default with the default --config), or only --config's, the method changed",
    )
    parser.add_argument(
        "--train-shots",
        choices=["1", "test"],
        default="1",
        help="train every model on 1-shot episodes and score it at every shot count (default), or "
        "train one model per shot count on episodes with that many supports ('test')",
    )
    parser.add_argument(
        "--length",
        choices=["config", "pseudo-novel"],
        default="config",
        help="each trained row's number of steps: the config's (default), or chosen per row on "
        "pseudo-novel validation of fold 0 (see above)",
    )
    parser.add_argument("--length-classes", nargs="+", type=int, default=LENGTH_CLASSES)
    parser.add_argument("--length-cap", type=int, default=4000, help="the longest run tried")
    parser.add_argument("--length-every", type=int, default=250, help="validate every N steps")
    parser.add_argument(
        "--search-only",
        action="store_true",
        help="with --length pseudo-novel: stop once every row's length is chosen (a search of another "
        "setting, e.g. a learning rate, needs no fold models)",
    )
    args = parser.parse_args()
    if args.search_only and args.length != "pseudo-novel":
        parser.error("--search-only needs --length pseudo-novel")
    out = Path(args.out).resolve()
    if not args.collect:
        # the evaluations of one --out are all of models trained one way: say so, and refuse a mix
        mode = out / "train_shots.txt"
        if mode.exists() and mode.read_text().strip() != args.train_shots:
            raise SystemExit(
                f"{out} holds models trained with --train-shots {mode.read_text().strip()}; "
                f"use another --out for --train-shots {args.train_shots}"
            )
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(mode, args.train_shots + "\n")
        if args.rows:
            rows = {name: ROWS[name] for name in args.rows}
        else:
            rows = ABLATIONS if args.ablations else {m: METHODS[m] for m in args.methods}
        own = args.recipe == "own" if args.recipe else Path(args.config).resolve() == CONFIG.resolve()
        search = args.length == "pseudo-novel"
        if search:
            fixed = [s for s in args.extra if s.split("=", 1)[0].strip() in LENGTH_SETTINGS]
            if fixed:
                raise SystemExit(f"--length pseudo-novel chooses this setting itself; drop --set {fixed[0]}")
        extra = {name: row_extra(name, own, args.extra, search) for name in rows}
        if search:
            rows = dict(rows)
            for name, row in rows.items():
                if row.train is not None:
                    steps = choose_length(
                        name,
                        row,
                        out,
                        extra[name],
                        Path(args.config),
                        args.length_classes,
                        args.length_cap,
                        args.length_every,
                    )
                    print(f"{name}: {steps} steps, chosen on pseudo-novel validation", flush=True)
                    rows[name] = with_length(row, steps)
            if args.search_only:
                return
        for fold in args.folds:
            for shots in args.shots:
                for name, row in rows.items():
                    train_shots = shots if args.train_shots == "test" else TRAIN_SHOTS
                    r = run_row(name, row, fold, shots, out, extra[name], Path(args.config), train_shots)
                    print(
                        f"{name} fold {fold} {shots}-shot: mIoU {100 * r['miou']['mean']:.1f} "
                        f"(train {r.get('train_seconds') or 0:.0f} s, eval {r['eval_seconds']:.0f} s)",
                        flush=True,
                    )
    records = collect(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "table.json", records)
    atomic_write_text(out / "table.md", table(records))
    print(table(records))


if __name__ == "__main__":
    main()
