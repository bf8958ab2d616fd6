"""The cost of the `probe` matcher's test-time step (``model.fusion.matcher = probe``): its fit to a support
set, and what it adds per query, next to ``proto``, on one thread.

Prints, from one run on real support sets of a cross-domain set (CCP `val` by default; its feature store
is built first if missing):

- ms per support set of the fit (``FewShotSegmenter.fit_probe``), for each fit (``model.fusion.probe.fit``:
  logistic, the default, L-BFGS on the support cells; ridge, the option, one closed-form solve), timed
  interleaved, at 1 and 5 shots, median and 95th percentile over ``--sets`` support sets;
- ms per query of the probe's map given its fit, against ``proto``'s map (both on the feature grid), timed
  interleaved query by query so that the machine's load falls on both alike;
- ms per query of the probe's per-pixel weight (``model.fusion.probe.coverage``: the query cells'
  similarity to the support's background cells, upsampled to the output size).

The fit is made once per support set (``dedn eval`` and ``Predictor`` keep it), so a query pays only the
second figure.

    OMP_NUM_THREADS=1 python benchmarks/probe.py
    OMP_NUM_THREADS=1 python benchmarks/probe.py --config configs/camvid_cross.yaml --sets 100
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dedn.config import load_config
from dedn.data.episodes import sample_test_episodes
from dedn.engine.benchmark import build_benchmark
from dedn.engine.evaluate import EpisodeRunner
from dedn.engine.features import open_feature_store
from dedn.models.network import FewShotSegmenter

REPO = Path(__file__).resolve().parents[1]


def ms(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"median {1000 * statistics.median(ordered):6.2f} ms, p95 {1000 * p95:6.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "ccp_cross.yaml"))
    parser.add_argument("--split", default="val", help="the test split to draw from ('none': the config's)")
    parser.add_argument("--sets", type=int, default=200, help="support sets per shot count")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="config override")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    for shots in (1, 5):
        split = [] if args.split == "none" else [f"data.test_split={args.split}"]
        cfg = load_config(
            args.config, [*args.extra, *split, f"data.shots={shots}", "model.fusion.matcher=probe"]
        )
        if cfg.model.fusion.probe.coverage is None:
            cfg.model.fusion.probe.coverage = [0.2, 0.4]
        bench = build_benchmark(cfg.data)
        model = FewShotSegmenter(cfg.model).eval()  # the probe and proto need no trained weights
        store = open_feature_store(cfg, model, bench.test_source, cpu, progress=False)
        runner = EpisodeRunner(model, bench.test_source, cfg.data.image_size, cpu, store)
        episodes = sample_test_episodes(bench.split.test_pairs, args.sets, shots, 0)
        fits: dict[str, list[float]] = {"logistic": [], "ridge": []}
        probe_query, proto_query, cover_query = [], [], []
        size = (cfg.data.image_size, cfg.data.image_size)
        with torch.no_grad():
            for i, ep in enumerate(episodes):
                q = {k: v.unsqueeze(0) for k, v in runner._features(ep.query).items()}
                feats = [runner._features(s) for s in ep.supports]
                sf = {k: torch.stack([f[k] for f in feats]).unsqueeze(0) for k in q}
                fg, bg = model._support_fractions(runner.support_masks(ep), q["high"].shape[-2:])
                order = list(fits) if i % 2 == 0 else list(fits)[::-1]
                for kind in order:
                    start = time.perf_counter()
                    made = model.fit_probe(sf["high"], fg, bg, fit=kind)
                    fits[kind].append(time.perf_counter() - start)
                    if kind == cfg.model.fusion.probe.fit:
                        fit = made
                arms = [("probe", probe_query), ("proto", proto_query)]
                for name, times in arms if i % 2 == 0 else arms[::-1]:
                    model.cfg.fusion.matcher = name
                    start = time.perf_counter()
                    model._matcher_logits(q, sf, fg, bg, fit)
                    times.append(time.perf_counter() - start)
                model.cfg.fusion.matcher = "probe"
                start = time.perf_counter()
                model._matcher_cover(q, sf, bg, size)
                cover_query.append(time.perf_counter() - start)
        print(f"{shots} shot(s), {len(episodes)} support sets of {Path(args.config).name} {args.split}:")
        for kind, times in fits.items():
            print(f"  probe fit per support set   {ms(times)}  ({kind})")
        print(f"  probe map per query         {ms(probe_query)}")
        print(f"  proto map per query         {ms(proto_query)}")
        print(f"  coverage weight per query   {ms(cover_query)}")


if __name__ == "__main__":
    main()
