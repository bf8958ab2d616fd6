"""Can the design tell that a query does not show the support's class? (issue 41, docs/results.md "Several
classes at once").

Two-way episodes (``dedn.data.episodes.add_ways``) on a selection set: ``--val`` the fold's base-class
validation episodes (held-out training images), or the config's test split (set
``data.test_split=val`` for CamVid / CCP ``val``). For every way it records whether the query shows the
class, the share the one-way answer paints and the share the two-way label map gives it, the highest
foreground probability, and a back-match score (the query's predicted region used as a support, matched
back onto the supports by nearest prototype, IoU with the support masks: PANet's alignment as a
test-time check), then prints how well each signal separates the two kinds of query (area under the ROC
curve) and the painted shares. Writes the per-way records to ``--out`` (JSON).

    python scripts/presence_check.py configs/pascal_offline.yaml --val \\
        --checkpoint runs/models/b-f0/checkpoints/best.pt --out runs/presence/pascal_val.json
    python scripts/presence_check.py configs/ccp_cross.yaml --set data.test_split=val \\
        --checkpoint runs/models/b-f0/checkpoints/best.pt --out runs/presence/ccp_val.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dedn.config import load_config
from dedn.data.episodes import add_ways
from dedn.engine.benchmark import build_benchmark
from dedn.engine.checkpoint import load_trained_model
from dedn.engine.distributed import DistInfo
from dedn.engine.evaluate import EpisodeRunner, episode_file, label_map, load_or_make_episodes
from dedn.engine.features import open_feature_store
from dedn.engine.train import validation_episodes
from dedn.models.ops import mask_fractions
from dedn.utils.io import atomic_write_json


def back_match(model, query_high, query_prob, support_high, support_masks) -> float | None:
    """IoU, on the feature grid, between the support masks and the support cells nearer (cosine) to the
    foreground prototype of the query's predicted region than to its background one; None when the
    query has no predicted cell."""
    grid = query_high.shape[-2:]
    fg = (F.adaptive_avg_pool2d(query_prob, grid) > 0.5).float()  # (1, 1, h, w)
    if fg.sum() < 1:
        return None
    protos = model._prototypes(query_high.unsqueeze(1), fg.unsqueeze(1), (1 - fg).unsqueeze(1))
    supports = F.normalize(support_high[0], dim=1)  # (K, C, h, w)
    bg_sim, fg_sim = (F.cosine_similarity(supports, p[:, :, None, None], dim=1) for p in protos)
    truth = mask_fractions(support_masks.flatten(0, 1), grid)[0][:, 0] > 0.5
    back = fg_sim > bg_sim
    return float((back & truth).sum()) / max(float((back | truth).sum()), 1.0)


def auc(positive, negative) -> float:
    """Area under the ROC curve of a score that should be higher for ``positive`` (ties count half)."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    return float(greater + 0.5 * (pos[:, None] == neg[None, :]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--val", action="store_true", help="the fold's base-class validation episodes")
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    n = args.episodes
    cfg = load_config(
        args.config, [*args.set, f"eval.episodes={n}", "eval.seeds=[0]", f"train.val_episodes={n}"]
    )
    cpu = torch.device("cpu")
    model = load_trained_model(cfg, args.checkpoint, cpu)[0].eval()
    bench = build_benchmark(cfg.data, progress=False)
    if args.val:
        source, first = bench.train_source, validation_episodes(cfg, bench)[:n]
        pairs = bench.split.val_pairs + bench.split.train_pairs
    else:
        source, pairs = bench.test_source, bench.split.test_pairs
        path = episode_file(cfg, bench, 0, n, Path(args.out).parent / "episodes")
        first = load_or_make_episodes(cfg, bench, 0, path, DistInfo())
    store = open_feature_store(cfg, model, source, cpu, progress=False)
    runner = EpisodeRunner(model, source, cfg.data.image_size, cpu, store)
    rows = []
    with torch.no_grad():
        for i, episode in enumerate(add_ways(first, pairs, 2, 0)):
            margins = []
            for w, way in enumerate(episode):
                label, out = runner.forward(way)
                target = runner.target(label, way.class_id)
                margin = runner.margin(out["logits"], label.shape[:2])
                margins.append(margin)
                feats = [runner._features(x) for x in (way.query, *way.supports)]
                support_high = torch.stack([f["high"] for f in feats[1:]]).unsqueeze(0)
                sf = {k: torch.stack([f[k] for f in feats[1:]]).unsqueeze(0) for k in feats[0]}
                rows.append(
                    {
                        "episode": i,
                        "way": w,
                        "class": way.class_id,
                        "present": int((target == 1).sum()),
                        "pixels": int((target != 255).sum()),
                        "painted": int((margin > 0).sum()),
                        "top": float(torch.sigmoid(margin.max())),
                        "back": back_match(
                            model,
                            feats[0]["high"].unsqueeze(0),
                            out["logits"].softmax(1)[:, 1:],
                            support_high,
                            runner.support_masks(way, sf),
                        ),
                    }
                )
            labels = label_map(margins)
            for w in range(len(episode)):
                rows[-len(episode) + w]["painted_in_map"] = int((labels == w + 1).sum())
    atomic_write_json(Path(args.out), rows)
    shown = [r for r in rows if r["present"]]
    absent = [r for r in rows if not r["present"]]
    print(f"{len(rows)} ways: {len(shown)} show their class, {len(absent)} do not")
    for key in ("top", "back"):
        a = auc(
            [r[key] if r[key] is not None else -1 for r in shown],
            [r[key] if r[key] is not None else -1 for r in absent],
        )
        print(f"  AUC of {key}: {a:.3f}")
    share = {k: np.array([r[k] / r["pixels"] for r in absent]) for k in ("painted", "painted_in_map")}
    painted_auc = auc([r["painted"] / r["pixels"] for r in shown], share["painted"])
    print(f"  AUC of the painted share: {painted_auc:.3f}")
    print(
        f"  where the class is absent: painted {100 * share['painted'].mean():.1f} % alone "
        f"(median {100 * np.median(share['painted']):.1f} %), {100 * share['painted_in_map'].mean():.1f} % "
        f"in the two-way label map (median {100 * np.median(share['painted_in_map']):.1f} %)"
    )
    mine = np.array([r["painted"] / r["pixels"] for r in shown])
    in_map = np.array([r["painted_in_map"] / r["pixels"] for r in shown])
    print(
        f"  where it is there: {100 * mine.mean():.1f} % alone, {100 * in_map.mean():.1f} % in the label map"
    )
    tops = np.array([r["top"] for r in shown if r["painted"]])
    cut = float(np.quantile(tops, 0.05))
    flagged = np.mean([r["top"] < cut for r in absent if r["painted"]])
    print(f"  highest probability below {cut:.2f} (keeps 95 % of the painted queries that show it): ", end="")
    print(f"flags {flagged:.2f} of those that do not")


if __name__ == "__main__":
    main()
