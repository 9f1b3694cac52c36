"""Sampling speed of the AR prior: KV cache against full recomputation, and MaskGIT against cached AR.

    python bench/sampling.py [--grid 16 16] [--dim 256] [--depth 8] [--batch 8]

MaskGIT runs ``steps`` full bidirectional passes over all tokens, i.e. ``steps`` times the
token-forwards of cached AR (which runs one token per step): it wins where a step's latency, not
its arithmetic, dominates (a GPU), and can lose on a compute-bound CPU.

Both AR runs use the same (randomly initialised) model and the same seed, so they draw the same
random numbers; the benchmark checks that they return the same codes before reporting the ratio.
Random weights are fine here: the work per token does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import time

# Set before torch starts its OpenMP pool. Bench machines are shared: with the default (spinning)
# wait policy a descheduled worker stalls every parallel region for a scheduler quantum, which hits
# the many small ops of cached decoding far harder than the big GEMMs of recomputation, so the ratio
# would measure the machine's load rather than the algorithm. Override by exporting the variable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(2)

from stage2.ar import ARPrior  # noqa: E402


def timed(fn, repeats: int = 1):
    """Best wall time over ``repeats`` runs (and the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--grid", type=int, nargs="+", default=[16, 16])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--codebook", type=int, default=1024)
    p.add_argument("--maskgit-steps", type=int, default=8)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    torch.manual_seed(0)
    spec = {"grid": args.grid, "depth": None, "codebook_size": args.codebook, "continuous_dim": None}
    arch = {"dim": args.dim, "depth": args.depth, "heads": args.heads}
    ar = ARPrior(code_spec=spec, num_classes=10, **arch).to(args.device).eval()
    n, tokens = args.batch, ar.seq_len
    cond = torch.arange(n) % 10
    print(f"AR prior: {tokens} tokens ({'x'.join(map(str, args.grid))} grid), dim {args.dim}, "
          f"{args.depth} layers, batch {n}, {torch.get_num_threads()} threads, device {args.device}", flush=True)

    def ar_sample(use_cache: bool) -> torch.Tensor:
        g = torch.Generator(device=args.device).manual_seed(0)
        return ar.sample(n, cond=cond, use_cache=use_cache, generator=g)

    ar_sample(True)  # warm-up (allocator, kernels)
    t_cache, codes_cache = timed(lambda: ar_sample(True), repeats=2)
    t_full, codes_full = timed(lambda: ar_sample(False))
    same = torch.equal(codes_cache, codes_full)
    print(f"AR with KV cache:        {t_cache:8.3f} s  ({t_cache / tokens * 1e3:.2f} ms/token)")
    print(f"AR full recomputation:   {t_full:8.3f} s  ({t_full / tokens * 1e3:.2f} ms/token)")
    print(f"KV-cache speed-up: {t_full / t_cache:.1f}x  (target >= 8x); identical codes: {same}")

    try:
        from stage2.maskgit import MaskGITPrior
    except ImportError as err:  # MASKGIT CASE: runs once stage2.maskgit.MaskGITPrior exists
        print(f"MaskGIT: skipped ({err})")
        return
    torch.manual_seed(0)
    mg = MaskGITPrior(code_spec=spec, num_classes=10, **arch).to(args.device).eval()

    def mg_sample() -> torch.Tensor:
        g = torch.Generator(device=args.device).manual_seed(0)
        return mg.sample(n, cond=cond, steps=args.maskgit_steps, generator=g)

    mg_sample()
    t_mg, mg_codes = timed(mg_sample, repeats=2)
    assert mg_codes.shape == codes_cache.shape
    print(f"MaskGIT {args.maskgit_steps} steps:         {t_mg:8.3f} s  "
          f"({args.maskgit_steps * tokens} token-forwards against {tokens} for cached AR)")
    verdict = "MaskGIT faster" if t_mg < t_cache else "cached AR faster"
    print(f"cached AR time / MaskGIT time: {t_cache / t_mg:.2f}  ({verdict})")


if __name__ == "__main__":
    main()
