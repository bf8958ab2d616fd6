"""Seconds per training step on stored features: the cost of one fold's training, without the backbone.

Training on the offline PASCAL-5i table never runs the frozen backbone: it reads stored features (see
``dedn features``). This script times what is left, the heads' forward, the loss at ``train.loss_size`` and
the backward and SGD step, for each method, with the settings of a config (default the table's). The
features come from the config's backbone on random images, so no data is needed; the support and query
masks are a fixed square object with a band of "ignore" pixels.

Each method runs ``--steps`` timed steps after two warm-up steps, in this process; the figures are
printed as a Markdown table. Compare ratios within one run (this machine is shared and noisy); to compare
two versions of the code, run the script once from each checkout, one after the other.

    python benchmarks/train_step.py                                   # dedn, object, scenario
    python benchmarks/train_step.py --methods dedn --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def masks(batch: int, shots: int, side: int, generator) -> tuple:
    import torch

    support = torch.zeros(batch, shots, side, side, dtype=torch.long)
    target = torch.zeros(batch, side, side, dtype=torch.long)
    for i in range(batch):
        # a square object of 20-45 % of the side at a random place, and a 4-pixel ignore band
        for view in [*support[i], target[i]]:
            size = int(side * (0.2 + 0.25 * torch.rand(1, generator=generator)))
            y, x = torch.randint(0, side - size, (2,), generator=generator).tolist()
            view[y : y + size, x : x + size] = 1
            view[y + size : y + size + 4, x : x + size] = 255
    return support, target


def time_method(method: str, args) -> tuple[float, dict]:
    """Seconds per training step of ``method`` on stored-feature inputs, and the settings used."""
    import torch
    import torch.nn.functional as F

    from dedn.config import load_config
    from dedn.losses import dedn_loss
    from dedn.models.network import FewShotSegmenter

    cfg = load_config(args.config, [f"model.method={method}", *args.overrides])
    side, batch, k = cfg.data.image_size, cfg.train.batch_size, args.shots
    loss_side = cfg.train.loss_size or side
    torch.manual_seed(0)
    model = FewShotSegmenter(cfg.model)
    g = torch.Generator().manual_seed(0)
    support_masks, target = masks(batch, k, side, g)
    with torch.no_grad():
        model.eval()
        feats = model.encode(torch.rand(batch * (k + 1), 3, side, side, generator=g))
    query = {n: t[:batch] for n, t in feats.items()}
    supports = {n: t[batch:].view(batch, k, *t.shape[1:]) for n, t in feats.items()}
    target = F.interpolate(target[:, None].float(), (loss_side, loss_side), mode="nearest")[:, 0].long()
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step():
        out = model(query, supports, support_masks, out_size=(loss_side, loss_side))
        loss = dedn_loss(out, target, cfg.loss, model.expert_names)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    settings = {
        "side": side,
        "batch": batch,
        "loss_side": loss_side,
        "grid": tuple(query["mid"].shape[-2:]),
        "train_steps": cfg.train.steps,
    }
    return (time.perf_counter() - start) / args.steps, settings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs" / "pascal_offline.yaml"))
    parser.add_argument("--methods", nargs="+", default=["dedn", "object", "scenario"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (default 10)")
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for method in args.methods:
        per_step, s = time_method(method, args)
        rows.append((method, per_step))
        print(f"{method}: {per_step:.3f} s/step", flush=True)
    print(
        f"\n{Path(args.config).name}: batch {s['batch']}, {args.shots}-shot, {s['side']} px (feature grid "
        f"{s['grid'][0]} x {s['grid'][1]}), loss at {s['loss_side']} px, {args.threads} thread(s), "
        f"{args.steps} timed steps\n"
    )
    print(f"| method | s / step | x {s['train_steps']} steps (heads only: no validation, no data loading) |")
    print("|---|---|---|")
    for method, per_step in rows:
        print(f"| {method} | {per_step:.3f} | {per_step * s['train_steps']:.0f} s |")


if __name__ == "__main__":
    main()
