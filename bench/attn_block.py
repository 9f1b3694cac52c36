"""The conv encoder/decoder's attention block (``stage1.conv_encoder_decoder.AttnBlock``) against the same
block fed strided q/k/v views (the code before the contiguous copy), forward under ``no_grad``,
interleaved rounds in one process.

    OMP_NUM_THREADS=1 python bench/attn_block.py [--rounds 5] [--iters 10] [--channels 128] [--size 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from stage1.conv_encoder_decoder import AttnBlock


def strided(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """The block's computation with q/k/v left as strided views (the reference)."""
    b, c, *grid = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(b, 3, c, -1).transpose(-1, -2).unbind(1)
    h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
    return x + block.proj(h.transpose(-1, -2).reshape(b, c, *grid))


def timed(fn, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    block = AttnBlock(args.channels, 2, 32).eval()
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    diff = (block(x) - strided(block, x)).abs().max().item()
    ratios = []
    for r in range(args.rounds):
        pair = [("old", lambda: strided(block, x)), ("new", lambda: block(x))]
        t = {name: timed(fn, args.iters) for name, fn in (pair if r % 2 == 0 else pair[::-1])}
        ratios.append(t["old"] / t["new"])
    print(f"AttnBlock {args.channels} ch, {args.size}x{args.size}, batch {args.batch}, {torch.get_num_threads()} "
          f"thread(s): max |difference| {diff:.1e}; strided / contiguous time {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
