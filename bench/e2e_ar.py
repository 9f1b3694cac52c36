"""AR prior training step and 256-token top-k sampling against x-transformers (issue 22).

``python bench/e2e_ar.py [--rounds 5] [--threads 1 2] [--batch 8] [--dim 256] [--depth 6] [--heads 8]``

Matched decoder-only transformers over a 16 x 16 grid of codes (256 tokens, 1024 codes): dim 256,
6 layers, 8 heads of 32, RMSNorm, SwiGLU feed-forward (hidden ``2/3 * 4 * dim`` rounded up to 8 = 688,
our ``layers.mlp`` width, given to x-transformers as ``ff_mult``), rotary positions, no dropout,
untied output head, unconditional (a start token).

- ``ours``: ``stage2.ar.ARPrior`` (``loss`` -> backward -> its AdamW, fused as
  ``scripts/train.py`` switches it by default); sampling ``ARPrior.sample(top_k=100)`` with its KV cache.
- ``x-transformers``: ``TransformerWrapper(Decoder(attn_flash=True, ...))`` -- ``attn_flash`` is
  torch's SDPA -- over 1025 tokens (the codes and a start token), cross-entropy on the same
  next-token targets, ``torch.optim.AdamW`` with its default (foreach) implementation; sampling
  ``AutoregressiveWrapper.generate(cache_kv=True, filter_logits_fn=top_k, k=100)``.

Rounds alternate the order; the ratio per round is x-transformers time / our time.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.interleaved import interleaved_ratio  # noqa: E402
from stage2.ar import ARPrior  # noqa: E402
from tokenforge.acceleration import fuse_adam  # noqa: E402


def build(args: argparse.Namespace):
    from x_transformers import AutoregressiveWrapper, Decoder, TransformerWrapper

    spec = {"grid": [16, 16], "depth": None, "codebook_size": args.codebook, "continuous_dim": None}
    ours = ARPrior(code_spec=spec, num_classes=None, dim=args.dim, depth=args.depth, heads=args.heads,
                   mlp_ratio=4.0, norm="rmsnorm", mlp="swiglu", positions="rope1d", dropout=0.0)
    theirs = TransformerWrapper(num_tokens=args.codebook + 1, max_seq_len=256, use_abs_pos_emb=False,
                                attn_layers=Decoder(dim=args.dim, depth=args.depth, heads=args.heads,
                                                    attn_flash=True, rotary_pos_emb=True, use_rmsnorm=True,
                                                    ff_glu=True, ff_swish=True, attn_dim_head=args.dim // args.heads,
                                                    ff_mult=swiglu_hidden(args.dim) / args.dim))
    return ours, theirs, AutoregressiveWrapper(theirs)


def swiglu_hidden(dim: int, ratio: float = 4.0) -> int:
    return -(-int(2 / 3 * ratio * dim) // 8) * 8


def count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--codebook", type=int, default=1024)
    p.add_argument("--sample-batch", type=int, default=4)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    ours, theirs, wrapper = build(args)
    print(f"parameters ours {count(ours):,}  x-transformers {count(theirs):,}")
    opt_ours = ours.configure_optimizers()["optimizer"]  # AdamW, no decay on norms/biases/embeddings
    print(f"our optimizer {type(opt_ours).__name__} fused: {fuse_adam(opt_ours)}")
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05)
    codes = torch.randint(0, args.codebook, (args.batch, 16, 16))
    bos = args.codebook

    def step_ours() -> None:
        loss = ours.loss(codes, None).loss
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def step_theirs() -> None:
        flat = codes.flatten(1)
        inp = torch.cat([torch.full((args.batch, 1), bos), flat[:, :-1]], 1)
        logits = theirs(inp)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat.reshape(-1))
        opt_theirs.zero_grad(set_to_none=True)
        loss.backward()
        opt_theirs.step()

    def sample_ours() -> None:
        g = torch.Generator().manual_seed(0)
        ours.sample(args.sample_batch, top_k=args.top_k, use_cache=True, generator=g)

    def sample_theirs() -> None:
        out = wrapper.generate(torch.full((args.sample_batch, 1), bos), 256, cache_kv=True,
                               filter_kwargs={"k": args.top_k})
        assert out.shape == (args.sample_batch, 256)

    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, mine, peer, mode in (("training step", step_ours, step_theirs, "train"),
                                       ("sampling 256 tokens", sample_ours, sample_theirs, "eval")):
            ours.train(mode == "train")
            theirs.train(mode == "train")
            interleaved_ratio(mine, peer, args.rounds, f"threads {threads}: {name}", "x-transformers")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        torch.set_num_threads(args.threads[0])
        for name, fn, mode in (("ours training step", step_ours, True), ("x-transformers training step",
                               step_theirs, True), ("ours sampling", sample_ours, False),
                               ("x-transformers sampling", sample_theirs, False)):
            ours.train(mode)
            theirs.train(mode)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"--- {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
