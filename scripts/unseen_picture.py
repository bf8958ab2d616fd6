"""A picture grid of episodes on an unseen domain: each member of DEDN (both experts and the `probe`
matcher), the fusion, round 12's fusion (AWF with `proto` and confidence weighting) and the training-free
`proto`, on the same episodes, each with its IoU and the fusion's weights.

The episodes are the first ``--rows`` of a seed's test (or ``--split val``) episode file that the config
would score, so the picture shows typical episodes, not chosen ones.

    python scripts/unseen_picture.py --config configs/ccp_cross.yaml \\
        --checkpoint runs/models/b-f0/checkpoints/best.pt --split val --out docs/ccp_episodes.png
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from PIL import Image

from dedn.config import load_config
from dedn.data.episodes import sample_test_episodes
from dedn.engine.benchmark import build_benchmark
from dedn.engine.checkpoint import load_trained_model
from dedn.engine.evaluate import EpisodeResult, EpisodeRunner
from dedn.engine.features import open_feature_store
from dedn.models.network import FewShotSegmenter
from dedn.vis import EpisodeRecorder, episode_grid

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "ccp_cross.yaml"))
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--split", default=None, help="the set's split (default: the config's)")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    settings = [f"data.test_split={args.split}"] if args.split else []
    cfg = load_config(args.config, settings)
    cpu = torch.device("cpu")
    bench = build_benchmark(cfg.data)
    model = load_trained_model(cfg, args.checkpoint, cpu)[0].eval()
    previous = copy.deepcopy(model)
    fusion = previous.cfg.fusion
    fusion.matcher, fusion.confidence, fusion.score = "proto", True, "soft"
    proto_cfg = copy.deepcopy(cfg.model)
    proto_cfg.method = "proto"
    proto = FewShotSegmenter(proto_cfg, model.backbone).eval()
    store = open_feature_store(cfg, model, bench.test_source, cpu, progress=False)
    runners = {name: EpisodeRunner(m, bench.test_source, cfg.data.image_size, cpu, store)
               for name, m in (("dedn", model), ("previous", previous), ("proto", proto))}  # fmt: skip
    recorder = EpisodeRecorder(bench.test_source, cfg.data.image_size, args.rows, args.seed)
    episodes = sample_test_episodes(bench.split.test_pairs, cfg.eval.episodes, cfg.data.shots, args.seed)
    rows = []
    for index, episode in enumerate(episodes[: args.rows]):
        results = {}
        for name, runner in runners.items():
            prediction, _, out = runner.run(episode)
            results[name] = (prediction, out)
        prediction, out = results["dedn"]
        row = recorder.make_row(index, EpisodeResult(episode, prediction, out))
        for name, title in (("previous", "round 12"), ("proto", "proto")):
            extra = recorder.make_row(index, EpisodeResult(episode, results[name][0], {}))
            row.predictions[title] = extra.predictions["prediction"]
            row.scores[title] = extra.scores["prediction"]
        rows.append(row)
    path = episode_grid(rows, args.out)
    # 256 colours (octree, no dithering): a third of the bytes, and the overlays keep their colours
    picture = Image.open(path).convert("RGB")
    picture.quantize(256, Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
