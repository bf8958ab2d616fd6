"""The README's picture: the shipped model on real photos it was not trained on.

Each row is one 1-shot episode: the support with its mask, the query with the true mask, the shipped
model's prediction and the training-free ``proto`` baseline's, each with its IoU. PASCAL rows use VOC 2012
val images held out of the shipped model's training (its validation images: it has seen their classes);
CamVid rows are street scenes of classes unlike PASCAL's (sky, road, tree) and one it knows (car).

    python scripts/front_picture.py --out docs/predictions.png
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dedn.models.network import FewShotSegmenter
from dedn.predict import Predictor
from dedn.vis import GridRow, episode_grid

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DEDN_SHARED_DATA", REPO.parent / "shared" / "data"))

#: (data set, support id, query id, class value in the label maps, class name)
EPISODES = [
    ("pascal", "2007_002445", "2007_004856", 8, "cat"),
    ("pascal", "2010_000159", "2007_009562", 12, "dog"),
    ("camvid", "0001TP_009810", "Seq05VD_f03600", 1, "sky"),
    ("camvid", "0001TP_008970", "Seq05VD_f00030", 6, "tree"),
    ("camvid", "0001TP_009180", "0001TP_009390", 9, "car"),
]


def read(dataset: str, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    if dataset == "pascal":
        root = DATA / "pascal-voc2012-val"
        image, label = (
            root / "JPEGImages" / f"{image_id}.jpg",
            root / "SegmentationClassAug" / f"{image_id}.png",
        )
    else:
        root = DATA / "camvid"
        image, label = root / "images" / f"{image_id}.jpg", root / "labels" / f"{image_id}.png"
    return np.asarray(Image.open(image).convert("RGB")), np.asarray(Image.open(label))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "predictions.png"))
    parser.add_argument("--tile", type=int, default=140)
    args = parser.parse_args(argv)
    model = Predictor.from_pretrained(device="cpu")
    cfg = copy.deepcopy(model.config.model)
    cfg.method = "proto"
    proto = Predictor(FewShotSegmenter(cfg), model.image_size, torch.device("cpu"))
    rows = []
    for dataset, support_id, query_id, value, name in EPISODES:
        support, support_label = read(dataset, support_id)
        query, query_label = read(dataset, query_id)
        mask = (support_label == value).astype(np.uint8)
        truth = (query_label == value).astype(np.uint8)
        predictions = {
            "shipped DEDN": model.predict(query, support, mask).mask,
            "proto": proto.predict(query, support, mask).mask,
        }
        rows.append(GridRow([(support, mask)], query, predictions, truth, title=f"{name} ({dataset})"))
    path = episode_grid(rows, args.out, tile=args.tile)
    # a palette of 256 colours keeps the page light (about a third of the bytes); the masks stay legible
    Image.open(path).quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"{path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
