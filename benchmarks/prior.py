"""The training-free prior (PFENet): comparing each query cell with the support's foreground cells only
(``dedn.models.ops.cosine_prior``) against the full query x support similarity masked afterwards.

Both give the same map (checked here); the figures are milliseconds per call and their ratio, in one run.

    python benchmarks/prior.py            # Lite0 at 417 px: 624 channels on a 27 x 27 grid
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dedn.models.ops import cosine_prior, min_max_normalize


def masked_full_prior(query_high, support_high, support_fg):
    """The straightforward version: all hw x hw similarities, non-foreground columns masked."""
    b, k, c, h, w = support_high.shape
    q = F.normalize(query_high.flatten(2), dim=1)
    priors = []
    for shot in range(k):
        s = F.normalize(support_high[:, shot].flatten(2), dim=1)
        fg = (support_fg[:, shot].flatten(1) > 0.5).float()
        sim = torch.einsum("bcq,bcs->bqs", q, s).masked_fill(fg.unsqueeze(1) == 0, -2.0)
        best = sim.max(dim=2).values.view(b, 1, h, w)
        best = torch.where((fg.sum(dim=1) == 0).view(b, 1, 1, 1), torch.zeros_like(best), best)
        priors.append(min_max_normalize(best))
    return torch.stack(priors, dim=0).mean(dim=0)


def timed(fn, args, repeat: int) -> float:
    fn(*args)
    start = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - start) / repeat * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, default=624)
    parser.add_argument("--grid", type=int, default=27)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g, c, b = args.grid, args.channels, args.batch
    print(f"batch {b}, {c} channels, {g} x {g} grid, {args.threads} threads; ms per call")
    print("| support foreground | masked full | foreground only | speed-up |")
    print("|---|---|---|---|")
    for fraction in (0.05, 0.2, 0.4, 0.8):
        q, s = torch.randn(b, c, g, g), torch.randn(b, 1, c, g, g)
        fg = (torch.rand(b, 1, 1, g, g) < fraction).float()
        assert torch.equal(cosine_prior(q, s, fg), masked_full_prior(q, s, fg))
        full = timed(masked_full_prior, (q, s, fg), args.repeat)
        ours = timed(cosine_prior, (q, s, fg), args.repeat)
        print(f"| {fraction:.0%} of cells | {full:.1f} | {ours:.1f} | {full / ours:.1f}x |")


if __name__ == "__main__":
    main()
