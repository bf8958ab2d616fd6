"""Episodic evaluation under the protocol of PROTOCOL.md.

Episodes come from a file written from a seed (never from the loop), predictions are scored at the
original label size, several seeds are reported as mean +- std, and each image's frozen backbone features
are computed once per run and reused (``eval.feature_cache``). Under torchrun the episodes are sharded over
the processes and the metric totals are summed.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dedn.config import Config, to_dict
from dedn.data.episodes import (
    Episode,
    add_ways,
    binarize,
    read_episodes,
    sample_test_episodes,
    write_episodes,
)
from dedn.data.index import ignore_value
from dedn.data.transforms import TestTransform, restore_logits
from dedn.engine.benchmark import Benchmark, build_benchmark
from dedn.engine.distributed import DistInfo
from dedn.engine.features import FeatureCache, ImageEncoder, open_feature_store
from dedn.errors import ConfigError, DataError
from dedn.metrics import FewShotIoU, aggregate_seeds
from dedn.models.ops import label_map
from dedn.utils.io import atomic_write_json, atomic_write_text
from dedn.utils.machine import machine_info
from dedn.weak import (
    box_from_mask,
    box_mask,
    box_support,
    equal_scores,
    scribble_seed,
    scribbles_from_mask,
)


@dataclass
class EpisodeResult:
    """What one evaluated episode produced (for pictures and tests)."""

    episode: Episode
    prediction: torch.Tensor  # (H, W) at the original label size
    outputs: dict


class EpisodeRunner:
    """Loads, transforms and encodes the images of an episode, and runs the model on it."""

    #: how many support sets' scores (and probe fits) are kept
    _max_scores = 65536

    def __init__(
        self,
        model,
        source,
        size: int,
        device: torch.device,
        cache: FeatureCache | None,
        pad_fill: tuple[float, float, float] | None = None,
        annotation: str = "mask",
        box_refinement: str = "probe",
        seed: int = 0,
    ):
        self.model = model
        # weak supports (dedn.weak): each support's box or scribbles are made from its mask
        self.annotation, self.box_refinement, self.seed = annotation, box_refinement, seed
        self._weak: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.source = source
        self.transform = TestTransform(size) if pad_fill is None else TestTransform(size, pad_fill)
        self.size = size
        self.device = device
        self.encoder = ImageEncoder(model, device, cache)
        self.ignore = ignore_value(source)
        # labels recur as often as images do: decode each once (bounded, a COCO split has 40k)
        self._labels: OrderedDict[str, np.ndarray] = OrderedDict()
        self._max_labels = 4096
        # AWF's support scores depend on the support set alone, which recurs (1,000 one-shot PASCAL
        # episodes hold 338-549 distinct ones): each is computed once, and reused bit-identical
        self._scores: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._probes: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def _remember(self, key: tuple, value, cache: OrderedDict | None = None) -> None:
        """Keep ``value`` under ``key`` in ``cache`` (default: the support scores), oldest out first."""
        cache = self._scores if cache is None else cache
        cache[key] = value
        if len(cache) > self._max_scores:
            cache.popitem(last=False)

    def _self_scores(self, episode: Episode, sf: dict, masks: torch.Tensor) -> torch.Tensor:
        """AWF's (1, E) scores under ``model.fusion.support_pass = self``: each shot's score depends on
        that support image and the class alone, so it is computed once per (image, class) and reused in
        every episode where that support recurs (in any position); the same numbers as one pass over the
        episode's shots."""
        per_shot = []
        for i, sid in enumerate(episode.supports):
            key = ("shot", sid, episode.class_id)
            if key not in self._scores:
                one = {name: t[:, i : i + 1] for name, t in sf.items()}
                self._remember(
                    key, self.model.shot_scores(one, masks[:, i : i + 1], (self.size, self.size))[:, 0]
                )
            per_shot.append(self._scores[key])
        return torch.stack(per_shot, dim=1).mean(dim=1)

    def label(self, image_id: str) -> np.ndarray:
        if image_id in self._labels:
            self._labels.move_to_end(image_id)
            return self._labels[image_id]
        label = self.source.load_label(image_id)
        # the prediction is made on the image and restored to the label's size: both must agree (an image
        # encoded from the feature store is never decoded here, so its size comes from the file's header)
        self.source.check_same_size(image_id, self.source.image_hw(image_id), label.shape)
        self._labels[image_id] = label
        if len(self._labels) > self._max_labels:
            self._labels.popitem(last=False)
        return label

    def _features(self, image_id: str):
        return self.encoder(image_id, lambda: self.transform(self.source.load_image(image_id))[0])

    def support_masks(self, episode: Episode, features: dict | None = None) -> torch.Tensor:
        """The episode's (1, K, S, S) support masks, given as ``annotation`` says (a box refined with the
        support's ``features`` (1, K, C, h, w), the episode's support features)."""
        masks = []
        for i, sid in enumerate(episode.supports):
            key = (sid, episode.class_id)
            if key in self._weak:
                masks.append(self._weak[key])
                continue
            binary = binarize(self.label(sid), episode.class_id, self.ignore)
            if self.annotation == "scribble":
                binary = scribbles_from_mask(binary, scribble_seed(sid, episode.class_id, self.seed))
            elif self.annotation == "box":
                box = box_from_mask(binary)
                binary = np.zeros_like(binary) if box is None else box_mask(binary.shape, box)
            _, mask, _ = self.transform(None, binary)
            if self.annotation == "box" and self.box_refinement != "none" and features is not None:
                mask = box_support(
                    features["high"][0, i],
                    mask.to(self.device),
                    self.box_refinement,
                    self.model.fit_box_probe,
                    self.model._support_fractions,
                )
            if self.annotation != "mask":  # made once per (image, class), reused in every episode
                self._remember(key, mask, self._weak)
            masks.append(mask)
        return torch.stack(masks).unsqueeze(0).to(self.device)  # (1, K, S, S)

    def margin(self, logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(1, 2, S, S) network logits -> (H, W) foreground minus background logit at the original label
        size ``hw`` (> 0: the object)."""
        restored = restore_logits(logits, self.transform.scaled_hw(hw), hw)
        return restored[0, 1] - restored[0, 0]

    def prediction(self, logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(1, 2, S, S) network logits -> (H, W) {0, 1} at the original label size ``hw``."""
        restored = restore_logits(logits, self.transform.scaled_hw(hw), hw)
        # foreground where its logit is larger: argmax over two channels, without the slow strided
        # reduction (ties go to background, as with argmax)
        return (restored[0, 1] > restored[0, 0]).long()

    def target(self, label: np.ndarray, class_id: int) -> torch.Tensor:
        """The episode's (H, W) {0, 1, 255} target for ``class_id`` in the query's ``label``."""
        return torch.from_numpy(binarize(label, class_id, self.ignore).astype(np.int64)).to(self.device)

    @torch.no_grad()
    def run(self, episode: Episode, class_ids: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """-> prediction (H, W), target (H, W) at the query's original label size, model outputs.
        ``class_ids``: give the model the episode's class (BAM's validation on base classes only)."""
        label, out = self.forward(episode, class_ids)
        prediction = self.prediction(out["logits"], label.shape[:2])
        return prediction, self.target(label, episode.class_id), out

    @torch.no_grad()
    def forward(self, episode: Episode, class_ids: bool = False) -> tuple[np.ndarray, dict]:
        """-> the query's label map and the model's outputs for ``episode``."""
        label = self.label(episode.query)
        q = self._features(episode.query)
        s = [self._features(sid) for sid in episode.supports]
        qf = {k: v.unsqueeze(0) for k, v in q.items()}
        sf = {k: torch.stack([f[k] for f in s]).unsqueeze(0) for k in q}
        key = (tuple(episode.supports), episode.class_id)
        masks = self.support_masks(episode, sf)
        fusion = getattr(self.model.cfg, "fusion", None)
        awf = getattr(self.model, "method", "") == "dedn" and getattr(fusion, "mode", "") == "awf"
        if awf and self.annotation == "box":
            cached = equal_scores(self.model, self.device)  # no mask to score the members against
        elif awf and len(episode.supports) > 1 and fusion.support_pass == "self":
            cached = self._self_scores(episode, sf, masks)
        else:
            cached = self._scores.get(key)
        extra = {"class_ids": torch.tensor([episode.class_id], device=self.device)} if class_ids else {}
        # the probe matcher is fitted once per support set, as the support scores are computed once
        probe = self._probes.get(key)
        out = self.model.forward_features(
            qf, sf, masks, (self.size, self.size), support_scores=cached, probe=probe, **extra
        )
        if cached is None and "support_scores" in out and awf:
            self._remember(key, out["support_scores"])
        if probe is None and "probe" in out:
            self._remember(key, out["probe"], self._probes)
        return label, out


def other_fusions(out: dict) -> dict[str, torch.Tensor]:
    """Log-probabilities of the fusions that the experts' outputs give without another pass: plain
    averaging and, when the model has one, the learned gate (whatever ``model.fusion.mode`` is)."""
    probs = torch.stack([x.softmax(dim=1) for x in out["experts"].values()]).mean(dim=0)
    fusions = {"fusion=mean": probs.clamp_min(1e-6).log()}
    # the training-free member of AWF (model.fusion.matcher), scored alone as the experts are
    fusions.update({f"matcher={name}": logits for name, logits in out.get("matcher", {}).items()})
    if "gate_probability" in out:
        fusions["fusion=gate"] = out["gate_probability"].clamp_min(1e-6).log()
    return fusions


def evaluate_episodes(
    model,
    source,
    episodes: list[Episode],
    classes: list[int],
    size: int,
    device: torch.device,
    cache: FeatureCache | None = None,
    dist_info: DistInfo | None = None,
    progress: bool = True,
    desc: str = "eval",
    on_episode: Callable[[int, EpisodeResult], None] | None = None,
    expert_metrics: dict[str, FewShotIoU] | None = None,
    pad_fill: tuple[float, float, float] | None = None,
    class_ids: bool = False,
    annotation: str = "mask",
    box_refinement: str = "probe",
    seed: int = 0,
) -> FewShotIoU:
    """Score ``episodes`` (this process's share of them) and return the metric, summed over processes.

    With ``expert_metrics`` (a dict), each expert of a fused model is also scored on its own, from the
    same forward pass: ``expert_metrics[name]`` is filled with its metric; so are the fusions that need
    no extra pass (``fusion=mean``, and ``fusion=gate`` for a model with a fusion gate). ``pad_fill``:
    the test images' padding colour (default: the ImageNet mean, as the feature store's; a different
    fill needs ``cache`` to be an in-memory cache, not the store). ``class_ids``: give the model each
    episode's class (validation of BAM on base classes; never the test, whose classes are novel).
    ``annotation``, ``box_refinement``: how the supports are given (``eval.support_annotation``,
    ``eval.box_refinement``); ``seed``: the episodes' seed, from which scribbles are drawn."""
    dist_info = dist_info or DistInfo()
    runner = EpisodeRunner(model, source, size, device, cache, pad_fill, annotation, box_refinement, seed)
    metric = FewShotIoU(classes)
    model.eval()
    mine = range(dist_info.rank, len(episodes), dist_info.world_size)
    for i in tqdm(mine, desc=desc, disable=not (progress and dist_info.is_main), leave=False):
        prediction, target, out = runner.run(episodes[i], class_ids)
        metric.update(prediction, target, episodes[i].class_id)
        if expert_metrics is not None and len(out.get("experts", {})) > 1:
            for name, logits in {**out["experts"], **other_fusions(out)}.items():
                expert = expert_metrics.setdefault(name, FewShotIoU(classes))
                if out["empty_support"].item():  # the fused output's rule applies to every expert
                    expert.update(prediction, target, episodes[i].class_id)
                else:
                    expert.update(runner.prediction(logits, target.shape), target, episodes[i].class_id)
        if on_episode is not None:
            on_episode(i, EpisodeResult(episodes[i], prediction, out))
    metric.all_reduce()
    for expert in (expert_metrics or {}).values():
        expert.all_reduce()
    return metric


def evaluate_nway_episodes(
    model,
    source,
    episodes: Sequence[tuple[Episode, ...]],
    classes: list[int],
    size: int,
    device: torch.device,
    cache: FeatureCache | None = None,
    dist_info: DistInfo | None = None,
    progress: bool = True,
    desc: str = "eval",
    annotation: str = "mask",
    box_refinement: str = "probe",
    seed: int = 0,
) -> tuple[FewShotIoU, FewShotIoU, dict[str, float]]:
    """Score N-way episodes (:func:`dedn.data.episodes.add_ways`): each way is one one-way pass of the
    model (the query's features are encoded once and shared), and the N answers are merged into one label
    map (:func:`label_map`). Each class of an episode is scored on the label map, pixels of that class's
    number against that class's pixels in the query (PANet's N-way mIoU). Returns (the N-way metric, the
    metric of the N one-way answers on the same episodes, each class scored on its own mask, and the
    seconds spent in the passes and in the merge)."""
    dist_info = dist_info or DistInfo()
    runner = EpisodeRunner(model, source, size, device, cache, None, annotation, box_refinement, seed)
    nway, oneway = FewShotIoU(classes), FewShotIoU(classes)
    seconds = {"passes": 0.0, "merge": 0.0}
    model.eval()
    mine = range(dist_info.rank, len(episodes), dist_info.world_size)
    for i in tqdm(mine, desc=desc, disable=not (progress and dist_info.is_main), leave=False):
        start = time.perf_counter()
        margins, targets = [], []
        for way in episodes[i]:
            label, out = runner.forward(way)
            hw = label.shape[:2]
            margins.append(runner.margin(out["logits"], hw))
            targets.append(runner.target(label, way.class_id))
        middle = time.perf_counter()
        labels = label_map(margins)
        seconds["merge"] += time.perf_counter() - middle
        seconds["passes"] += middle - start
        for k, (way, margin, target) in enumerate(zip(episodes[i], margins, targets, strict=True)):
            nway.update((labels == k + 1).long(), target, way.class_id)
            oneway.update((margin > 0).long(), target, way.class_id)
    nway.all_reduce()
    oneway.all_reduce()
    return nway, oneway, seconds


def episode_file(cfg: Config, bench: Benchmark, seed: int, episodes: int, output_dir: Path) -> Path:
    folder = Path(cfg.eval.episode_dir) if cfg.eval.episode_dir else output_dir / "episodes"
    pairs = f"-pairs{bench.pair_list[:8]}" if bench.pair_list else ""
    name = f"{bench.name}-fold{bench.fold}-{cfg.data.shots}shot-seed{seed}-n{episodes}{pairs}.json"
    return folder / name


def _check_agrees(path: Path, meta: dict, expected: dict) -> None:
    """An episode file's meta must agree with the run's settings, else it is another run's file."""
    clash = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if clash:
        detail = ", ".join(f"{k}: file {a!r}, run {b!r}" for k, (a, b) in clash.items())
        raise DataError(
            f"episode file {path} was made for other settings ({detail}); delete it or point "
            "eval.episode_dir elsewhere"
        )


def load_or_make_episodes(
    cfg: Config, bench: Benchmark, seed: int, path: Path, dist_info: DistInfo
) -> list[Episode]:
    """Read the episode file, writing it first (main process only) when it does not exist."""
    from dedn.engine.distributed import barrier

    n = cfg.eval.episodes
    if not path.exists() and dist_info.is_main:
        episodes = sample_test_episodes(bench.split.test_pairs, n, cfg.data.shots, seed)
        write_episodes(path, episodes, bench.episode_meta(shots=cfg.data.shots, seed=seed, n=n))
    barrier(dist_info)
    episodes, meta = read_episodes(path)
    expected = bench.episode_meta(shots=cfg.data.shots, seed=seed, n=n)
    _check_agrees(path, meta, expected)
    return episodes


def load_or_make_nway(
    cfg: Config, bench: Benchmark, seed: int, path: Path, dist_info: DistInfo
) -> list[tuple[Episode, ...]]:
    """The seed's N-way episodes (``eval.ways``): the one-way episode file's episodes, each with the other
    ways drawn by :func:`~dedn.data.episodes.add_ways`, written (one line per way, the ways of an episode
    together) next to it so that a result can be traced to its episodes."""
    from dedn.engine.distributed import barrier

    ways, n = cfg.eval.ways, cfg.eval.episodes
    target = path.with_name(f"{path.stem}-{ways}way{path.suffix}")
    expected = {**bench.episode_meta(shots=cfg.data.shots, seed=seed, n=n * ways), "ways": ways}
    if not target.exists() and dist_info.is_main:
        first = load_or_make_episodes(cfg, bench, seed, path, DistInfo())
        names = bench.test_source.class_names
        episodes = add_ways(first, bench.split.test_pairs, ways, seed, names)
        write_episodes(target, [way for episode in episodes for way in episode], expected)
    barrier(dist_info)
    flat, meta = read_episodes(target)
    _check_agrees(target, meta, expected)
    return [tuple(flat[i : i + ways]) for i in range(0, len(flat), ways)]


def run_evaluation(
    cfg: Config,
    model,
    device: torch.device,
    output_dir: Path,
    checkpoint: Path | None = None,
    checkpoint_hash: str | None = None,
    dist_info: DistInfo | None = None,
    progress: bool = True,
    bench: Benchmark | None = None,
    on_episode: Callable[[int, int, EpisodeResult], None] | None = None,
) -> dict:
    """Evaluate every seed of ``cfg.eval.seeds``; write results.json and results.md (main process)."""
    dist_info = dist_info or DistInfo()
    if cfg.data.protocol == "all":
        raise ConfigError(
            "data.protocol = all trains on every class and has no test episodes: score the model on "
            "another set, e.g. configs/camvid_cross.yaml (data.protocol = cross)"
        )
    bench = bench or build_benchmark(cfg.data, progress=progress and dist_info.is_main)
    store = open_feature_store(
        cfg, model, bench.test_source, device, dist_info, progress and dist_info.is_main
    )
    cache = store or (FeatureCache() if cfg.eval.feature_cache else None)
    per_seed = []
    start = time.perf_counter()
    ways = cfg.eval.ways
    args = (model, bench.test_source)
    for seed in cfg.eval.seeds:
        path = episode_file(cfg, bench, seed, cfg.eval.episodes, output_dir)
        common = dict(
            classes=bench.split.novel,
            size=cfg.data.image_size,
            device=device,
            cache=cache,
            dist_info=dist_info,
            progress=progress,
            annotation=cfg.eval.support_annotation,
            box_refinement=cfg.eval.box_refinement,
            seed=seed,
        )
        if ways > 1:
            nway_episodes = load_or_make_nway(cfg, bench, seed, path, dist_info)
            metric, oneway, seconds = evaluate_nway_episodes(
                *args, nway_episodes, **common, desc=f"eval seed {seed}, {ways}-way"
            )
            result = metric.compute(cfg.eval.missing_class)
            result.update(seed=seed, episode_file=str(path.with_name(f"{path.stem}-{ways}way{path.suffix}")))
            result["experts"] = {"one-way runs": oneway.compute(cfg.eval.missing_class)}
            result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
            per_seed.append(result)
            continue
        episodes = load_or_make_episodes(cfg, bench, seed, path, dist_info)
        hook = (lambda i, r, seed=seed: on_episode(seed, i, r)) if on_episode else None
        experts: dict[str, FewShotIoU] = {}
        metric = evaluate_episodes(
            *args,
            episodes,
            **common,
            desc=f"eval seed {seed}",
            on_episode=hook,
            expert_metrics=experts,
        )
        result = metric.compute(cfg.eval.missing_class)
        result["seed"] = seed
        if experts:
            result["experts"] = {name: m.compute(cfg.eval.missing_class) for name, m in experts.items()}
        result["episode_file"] = str(path)
        per_seed.append(result)
    elapsed = time.perf_counter() - start
    summary = aggregate_seeds(per_seed)
    results = {
        "method": cfg.model.method,
        "settings": {
            "benchmark": bench.name,
            "protocol": cfg.data.protocol,
            "fold": bench.fold,
            "shots": cfg.data.shots,
            "ways": ways,
            "episodes": cfg.eval.episodes,
            "seeds": list(cfg.eval.seeds),
            "image_size": cfg.data.image_size,
            "scored_at": "original label size",
            "backbone": cfg.model.backbone,
            "backbone_weights": cfg.model.weights,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_sha256": checkpoint_hash,
            "novel_classes": bench.split.novel,
            "class_names": {c: bench.test_source.class_names[c - 1] for c in bench.split.novel},
            "feature_cache": cfg.eval.feature_cache,
            # the store the features came from (its key names the number type: float16 stores differ)
            "feature_store": store.key if store is not None else None,
            "missing_class": cfg.eval.missing_class,
            "support_annotation": cfg.eval.support_annotation,
            "box_refinement": cfg.eval.box_refinement if cfg.eval.support_annotation == "box" else None,
            "pair_list": cfg.data.pair_list,
            "world_size": dist_info.world_size,
            "machine": machine_info(device),
        },
        "summary": summary,
        # each expert of a fused model scored on its own (same episodes, same forward pass)
        "experts": {
            name: aggregate_seeds([r["experts"][name] for r in per_seed]) for name in per_seed[0]["experts"]
        }
        if "experts" in per_seed[0]
        else {},
        "per_seed": per_seed,
        "seconds": round(elapsed, 2),
        "config": to_dict(cfg),
    }
    if dist_info.is_main:
        atomic_write_json(output_dir / "results.json", results)
        atomic_write_text(output_dir / "results.md", results_markdown(results))
    return results


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def results_markdown(results: dict) -> str:
    s = results["settings"]
    summary = results["summary"]
    lines = [
        f"# {results['method']} on {s['benchmark']} fold {s['fold']}, "
        + (f"{s['ways']}-way " if s.get("ways", 1) > 1 else "")
        + f"{s['shots']}-shot",
        "",
        f"{s['episodes']} episodes x {len(s['seeds'])} seeds ({s['seeds']}), image size {s['image_size']}, "
        f"scored at the original label size, backbone {s['backbone']} ({s['backbone_weights']}).",
        "",
        "| metric | mean | std |",
        "|---|---|---|",
        f"| mIoU | {_pct(summary['miou']['mean'])} | {_pct(summary['miou']['std'])} |",
        f"| FB-IoU | {_pct(summary['fbiou']['mean'])} | {_pct(summary['fbiou']['std'])} |",
    ]
    for name, expert in results.get("experts", {}).items():
        miou = expert["miou"]
        if name == "one-way runs":
            what = f"the {s.get('ways', 1)} one-way answers, each class on its own mask"
        elif name.startswith("fusion="):
            what = f"the fused model scored with {name}"
        else:
            what = f"the {name} expert alone"
        lines.append(f"| mIoU of {what} | {_pct(miou['mean'])} | {_pct(miou['std'])} |")
    lines += [
        "",
        "| class | IoU (mean over seeds) |",
        "|---|---|",
    ]
    names = s["class_names"]
    for c, v in summary["class_iou"].items():
        lines.append(f"| {c} {names.get(c, names.get(int(c), ''))} | {_pct(v['mean'])} |")
    return "\n".join(lines) + "\n"


def format_summary(results: dict) -> str:
    summary = results["summary"]
    return (
        f"{results['method']}: mIoU {_pct(summary['miou']['mean'])} +- {_pct(summary['miou']['std'])}, "
        f"FB-IoU {_pct(summary['fbiou']['mean'])} +- {_pct(summary['fbiou']['std'])}"
    )


def dump(results: dict) -> str:
    return json.dumps(results["summary"], indent=2)
