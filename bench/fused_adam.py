"""Optimiser step time: torch's fused AdamW (what ``scripts/train.py`` switches every Adam/AdamW to,
``tokenforge.acceleration.fuse_adam``) against the default and ``foreach`` implementations, on the
parameters of a real prior, interleaved rounds in one process.

    OMP_NUM_THREADS=1 python bench/fused_adam.py [--rounds 5] [--steps 20] [--threads 1]

Prints ms per step for each and the ratio default / fused and foreach / fused (median, min-max).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stage2.ar import ARPrior
from stage2.optim import parameter_groups
from tokenforge.acceleration import fuse_adam

SPEC = {"grid": [16, 16], "depth": None, "codebook_size": 1024, "continuous_dim": None}


def step_ms(opt: torch.optim.Optimizer, steps: int) -> float:
    opt.step()  # state initialised outside the timing
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ARPrior(code_spec=SPEC, num_classes=10, dim=256, depth=6, heads=8)  # configs/ar.yaml's shape
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {"default": [], "foreach": [], "fused": []}
    for r in range(args.rounds):
        order = list(times) if r % 2 == 0 else list(reversed(times))
        for name in order:
            opt = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-4,
                                    **({"foreach": True} if name == "foreach" else {}))
            if name == "fused":
                assert fuse_adam(opt)
            times[name].append(step_ms(opt, args.steps))
    print(f"AR prior, {n:,} parameters, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps")
    for name, ts in times.items():
        print(f"  {name:8s} {statistics.median(ts):8.2f} ms/step")
    for name in ("default", "foreach"):
        ratios = [a / b for a, b in zip(times[name], times["fused"])]
        print(f"  {name} / fused: {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
