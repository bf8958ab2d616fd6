"""Which backbone levels match best for few-shot prototypes? (how the Lite default levels were chosen)

Training-free 1-shot matching on real PASCAL VOC 2012 val images (../shared/data/pascal-voc2012-val):
random (query, support) image pairs that share a class (each covering >= 2,048 pixels), resized so the
longer side is ``--size`` px. For every combination of levels, each level is L2-normalised per pixel,
resized to the finest stride of the combination and concatenated, then

* ``proto``: masked-average foreground and background prototypes of the support; a query pixel is
  foreground where it is closer (cosine) to the foreground prototype (PANet without training);
* ``nn``: nearest support pixel: foreground where the best cosine to a support foreground pixel beats the
  best cosine to a support background pixel (a proxy for the PFENet-style prior).

Scored with :class:`dedn.metrics.FewShotIoU` at the resized label size (255 ignored), mIoU over the 20
classes of the pairs drawn. Also times one forward per backbone at 417 and 473 px (batch 1).

    PYTHONPATH=src python benchmarks/backbone_levels.py --pairs 300 --backbones efficientnet_lite0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dedn.metrics import FewShotIoU
from dedn.models.backbones import create_backbone

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pascal-voc2012-val"

COMBOS = {
    "efficientnet": [
        ["stage3"],
        ["stage4"],
        ["stage5"],
        ["stage6"],
        ["stage7"],
        ["head"],
        ["stage4", "stage5"],
        ["stage5", "stage6"],
        ["stage5", "stage7"],
        ["stage6", "stage7"],
        ["stage4", "stage5", "stage7"],
        ["stage5", "stage6", "stage7"],
        ["stage5", "stage7", "head"],
    ],
    "resnet": [["layer2"], ["layer3"], ["layer4"], ["layer2", "layer3"], ["layer3", "layer4"]],
}


def draw_pairs(root: Path, n: int, seed: int) -> list[tuple[str, str, int]]:
    """(query id, support id, class) triples; both images have >= 2,048 pixels of the class."""
    ids = (root / "val.txt").read_text().split()
    by_class: dict[int, list[str]] = {}
    for image_id in ids:
        label = np.asarray(Image.open(root / "SegmentationClassAug" / f"{image_id}.png"))
        values, counts = np.unique(label, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            if 1 <= value <= 20 and count >= 2048:
                by_class.setdefault(value, []).append(image_id)
    rng = np.random.default_rng(seed)
    classes = sorted(by_class)
    pairs = []
    for i in range(n):
        cls = classes[i % len(classes)]  # balanced over classes, so every class IoU has episodes
        query, support = rng.choice(by_class[cls], size=2, replace=False)
        pairs.append((str(query), str(support), cls))
    return pairs


def load(root: Path, image_id: str, cls: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = Image.open(root / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
    label = Image.open(root / "SegmentationClassAug" / f"{image_id}.png")
    scale = size / max(image.size)
    new = (round(image.size[0] * scale), round(image.size[1] * scale))
    image = torch.from_numpy(np.array(image.resize(new, Image.BILINEAR))).permute(2, 0, 1).float() / 255
    label = torch.from_numpy(np.array(label.resize(new, Image.NEAREST)).astype(np.int64))
    mask = torch.where(label == 255, 255, (label == cls).long())
    return image[None], mask


def embed(feats: dict[str, torch.Tensor], combo: list[str]) -> torch.Tensor:
    size = max((feats[name].shape[-2:] for name in combo), key=lambda s: s[0] * s[1])
    parts = [
        F.interpolate(F.normalize(feats[n], dim=1), size=size, mode="bilinear", align_corners=False)
        for n in combo
    ]
    return F.normalize(torch.cat(parts, 1), dim=1)  # (1, C, h, w)


def predict(query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor, out_hw, method: str):
    h, w = support.shape[-2:]
    valid = (support_mask != 255).float()[None, None]
    fg = (support_mask == 1).float()[None, None]
    fg = F.interpolate(fg, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    valid = F.interpolate(valid, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    bg = (valid - fg).clamp(min=0)
    s = support[0].flatten(1)  # (C, h*w)
    q = query[0].flatten(1)
    if method == "proto":
        protos = torch.stack(
            [
                (s * bg.flatten()).sum(1) / bg.sum().clamp(min=1e-6),
                (s * fg.flatten()).sum(1) / fg.sum().clamp(min=1e-6),
            ]
        )
        score = F.normalize(protos, dim=1) @ q  # (2, hw)
    else:
        sim = s.T @ q  # (hw_s, hw_q)
        fg_sel, bg_sel = fg.flatten() > 0.5, bg.flatten() > 0.5
        if not fg_sel.any():
            fg_sel = fg.flatten() >= fg.max()
        score = torch.stack(
            [sim[bg_sel].amax(0) if bg_sel.any() else torch.full_like(sim[0], -1), sim[fg_sel].amax(0)]
        )
    score = score.view(1, 2, *query.shape[-2:])
    score = F.interpolate(score, size=out_hw, mode="bilinear", align_corners=False)
    return score.argmax(1)[0]


def time_forward(name: str, dilate: bool, sizes=(417, 473), repeats: int = 5) -> dict[int, float]:
    backbone = create_backbone(name, weights=None, dilate=dilate)
    out = {}
    with torch.inference_mode():
        for size in sizes:
            x = torch.rand(1, 3, size, size)
            backbone(x)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                backbone(x)
                times.append(time.perf_counter() - t0)
            out[size] = 1000 * float(np.median(times))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--size", type=int, default=417)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    parser.add_argument("--combos", nargs="+", help="level combinations to try, e.g. stage5+stage7")
    parser.add_argument("--timing", action="store_true", help="only time lite0 (dilated) and resnet50")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.timing:
        for name in ("efficientnet_lite0", "resnet50"):
            ms = time_forward(name, dilate=True)
            timings = ", ".join(f"{size} px {t:.0f} ms" for size, t in ms.items())
            print(f"{name} dilated, batch 1, random weights: {timings}")
        return

    pairs = draw_pairs(args.root, args.pairs, args.seed)
    classes = sorted({c for _, _, c in pairs})
    for name in args.backbones:
        backbone = create_backbone(name, weights="imagenet" if "lite" in name else None)
        combos = COMBOS["efficientnet" if "lite" in name else "resnet"]
        if args.combos:
            combos = [combo.split("+") for combo in args.combos]
        levels = sorted({level for combo in combos for level in combo})
        metrics = {(m, tuple(c)): FewShotIoU(classes) for m in ("proto", "nn") for c in combos}
        t0 = time.perf_counter()
        with torch.inference_mode():
            for query_id, support_id, cls in pairs:
                q_img, q_mask = load(args.root, query_id, cls, args.size)
                s_img, s_mask = load(args.root, support_id, cls, args.size)
                feats = backbone(torch.cat([q_img, s_img]) if q_img.shape == s_img.shape else q_img, levels)
                if q_img.shape == s_img.shape:
                    q_feats = {k: v[:1] for k, v in feats.items()}
                    s_feats = {k: v[1:] for k, v in feats.items()}
                else:
                    q_feats, s_feats = feats, backbone(s_img, levels)
                for combo in combos:
                    q, s = embed(q_feats, combo), embed(s_feats, combo)
                    for method in ("proto", "nn"):
                        pred = predict(q, s, s_mask, q_mask.shape, method)
                        metrics[(method, tuple(combo))].update(pred, q_mask, cls)
        seconds = time.perf_counter() - t0
        print(f"\n{name} (dilated), {len(pairs)} 1-shot pairs, {args.size} px, {seconds:.0f} s")
        print(f"{'levels':<28} {'proto mIoU':>10} {'FB-IoU':>7} {'nn mIoU':>8} {'FB-IoU':>7}")
        for combo in combos:
            p = metrics[("proto", tuple(combo))].compute()
            n = metrics[("nn", tuple(combo))].compute()
            print(
                f"{'+'.join(combo):<28} {100 * p['miou']:>10.1f} {100 * p['fbiou']:>7.1f} "
                f"{100 * n['miou']:>8.1f} {100 * n['fbiou']:>7.1f}"
            )


if __name__ == "__main__":
    main()
