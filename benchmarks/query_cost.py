"""What one query costs `dedn predict` on one thread, next to one backbone pass of that query: the shipped
model's `Predictor.predict` with encoded supports (what `dedn predict` runs per query file, decoding
excluded), the training-free `proto` on the same backbone, the backbone alone (resize, pad, encode), and
several classes at once (`Predictor.predict_classes`) next to one `predict` per class. Every setting is
timed on every query, interleaved (the order alternates), so that the machine's load falls on all alike;
the figures are medians over the queries and the ratios are taken from them.

    python benchmarks/query_cost.py                      # 20 queries of 500x375, 1 shot, 2 classes
    python benchmarks/query_cost.py --queries 40 --shots 5 --classes 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dedn.predict import Predictor, load_image


def _scene(rng: np.random.Generator, h: int = 375, w: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """A noisy picture with a brighter rectangle, and its mask."""
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    mask = np.zeros((h, w), np.uint8)
    mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
    image[mask == 1] = image[mask == 1] // 2 + 120
    return image, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    model = Predictor.from_pretrained(device="cpu")
    proto = Predictor.training_free("proto", model)
    sets, pictures = {}, {}
    for c in range(args.classes):
        pairs = [_scene(rng) for _ in range(args.shots)]
        pictures[c] = ([p[0] for p in pairs], [p[1] for p in pairs])
        sets[f"class{c + 1}"] = model.encode_supports(*pictures[c])
    first = next(iter(sets.values()))
    proto_set = proto.encode_supports(*pictures[0])
    queries = [load_image(_scene(rng)[0], f"query {i}") for i in range(args.queries)]

    def backbone(q):
        model._encode(q.pixels)

    def one(q):
        model.predict_loaded(q, first)

    def matcher(q):
        proto.predict_loaded(q, proto_set)

    def per_class(q):
        for s in sets.values():
            model.predict_loaded(q, s)

    def together(q):
        model.predict_classes_loaded(q, sets)

    settings = {
        "backbone pass": backbone,
        "DEDN predict": one,
        "proto predict": matcher,
        f"{args.classes} x predict": per_class,
        f"predict_classes ({args.classes})": together,
    }
    with torch.no_grad():
        for fn in settings.values():  # warm-up: the support-side work (AWF scores, probe fit) is done once
            fn(queries[0])
        times: dict[str, list[float]] = {name: [] for name in settings}
        for i, q in enumerate(queries):
            order = list(settings.items())
            for name, fn in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                fn(q)
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.queries} queries of 500x375, {args.shots} shot(s), shipped model {model.pretrained} at "
        f"{model.image_size} px, {args.threads} thread(s), torch {torch.__version__}"
    )
    for name, m in med.items():
        print(f"  {name:<24} median {1000 * m:7.1f} ms  ({m / med['backbone pass']:.2f}x the backbone pass)")
    print(f"  DEDN predict / backbone pass: {med['DEDN predict'] / med['backbone pass']:.2f} (goal <= 1.25)")
    ratio = med[f"predict_classes ({args.classes})"] / med[f"{args.classes} x predict"]
    print(f"  {args.classes} classes at once / {args.classes} one-class predicts: {ratio:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
