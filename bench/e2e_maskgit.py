"""MaskGIT prior training step and 8-step sampling against muse-maskgit-pytorch (issue 22).

``python bench/e2e_maskgit.py [--rounds 5] [--threads 1 2] [--batch 8] [--dim 256] [--depth 6] [--heads 8]``

Matched bidirectional transformers over a 16 x 16 grid of codes (256 tokens, 1024 codes + a mask token):
dim 256, 6 layers, 8 heads of 32, pre-LayerNorm, gated feed-forward of hidden ``2/3 * 4 * dim`` (ours
SwiGLU 688, muse's GEGLU ``int(2/3 * 4 * 256)`` = 682), learned absolute positions, no dropout, untied
output head over the 1024 codes, unconditional. muse-maskgit-pytorch is run WITHOUT its text
cross-attention (the strict comparison the issue asks for): every block's cross-attention layer is
removed and its blocks' forward runs self-attention and feed-forward only; the text embedding it
insists on is one all-zero token of width ``dim`` (its projection is then the identity, and nothing
reads it). What stays its own: its attention (l2-normalised q/k with learned scales, a null key/value,
``Attend(flash=...)``: on CPU ``flash=True`` is the chunked ``FlashAttentionFunction`` of
memory-efficient-attention-pytorch, ``flash=False`` an einsum softmax; ``--peer-flash`` picks, default 0,
the faster of the two on CPU),
its extra LayerNorm inside the feed-forward, its masking and its sampler.

- ``ours``: ``stage2.maskgit.MaskGITPrior.loss`` (a class token as prefix: 257 positions) -> backward ->
  its AdamW, fused as ``scripts/train.py`` switches it by default; sampling ``MaskGITPrior.sample(steps=8,
  top_k=103)``.
- ``muse``: ``MaskGit(codes, text_embeds=zeros, cond_drop_prob=0)`` (its cross-entropy over all positions
  with unmasked ones ignored) -> backward -> ``torch.optim.AdamW`` (default foreach); sampling
  ``MaskGit.generate(timesteps=8, cond_scale=1, topk_filter_thres=0.9)`` (top 103 of 1024, one forward
  per step: no guidance on either side).

Rounds alternate the order; the ratio per round is muse time / our time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.interleaved import interleaved_ratio, timed  # noqa: E402
from stage2.maskgit import MaskGITPrior  # noqa: E402
from tokenforge.acceleration import fuse_adam  # noqa: E402


def build_muse(args: argparse.Namespace):
    """muse-maskgit-pytorch's MaskGit at our size, its text cross-attention removed, no network access."""
    from transformers import T5Config

    t5 = importlib.import_module("muse_maskgit_pytorch.t5")
    muse = importlib.import_module("muse_maskgit_pytorch.muse_maskgit_pytorch")
    # Its Transformer asks T5Config.from_pretrained (a download) for the text width; seed its cache with
    # the model width instead, so the text projection is the identity and nothing is fetched.
    muse.tqdm = lambda steps, **_: steps  # its generate draws a progress bar over the steps; not timed
    t5.T5_CONFIGS[muse.DEFAULT_T5_NAME] = {"config": T5Config(d_model=args.dim)}

    class SelfAttentionOnlyBlocks(muse.TransformerBlocks):
        """Its blocks with the cross-attention layer removed: self-attention, feed-forward, final norm."""

        def forward(self, x, context=None, context_mask=None):
            for attn, ff in self.layers:
                x = attn(x) + x
                x = ff(x) + x
            return self.norm(x)

    net = muse.MaskGitTransformer(num_tokens=args.codebook, seq_len=256, dim=args.dim, depth=args.depth,
                                  heads=args.heads, dim_head=args.dim // args.heads, ff_mult=4,
                                  flash=args.peer_flash)
    blocks = net.transformer_blocks
    blocks.__class__ = SelfAttentionOnlyBlocks
    blocks.layers = nn.ModuleList([nn.ModuleList([attn, ff]) for attn, _cross, ff in blocks.layers])
    del net.self_cond_to_init_embed, net.norm  # built but unused without self-conditioning (its forward skips both)
    net.encode_text = lambda texts: torch.zeros(len(texts), 1, args.dim)  # generate's text path, unread
    # MaskGit insists on a VAE (it checks the codebook size at construction, asks it for the grid size in
    # generate and decodes at the end): a tiny one to construct, then a parameter-free stand-in that gives
    # the grid and returns the code ids as they are, so both sides stop at codes.
    vae = importlib.import_module("muse_maskgit_pytorch.vqgan_vae").VQGanVAE(
        dim=16, layers=1, codebook_size=args.codebook, use_vgg_and_gan=False)
    model = muse.MaskGit(image_size=32, transformer=net, vae=vae, cond_drop_prob=0.0)
    model.vae = model.cond_vae = CodesOnly()
    return model


class CodesOnly(nn.Module):
    """Stands in for muse's VAE after construction: 16 x 16 codes, no decoding."""

    def get_encoded_fmap_size(self, image_size: int) -> int:
        return 16

    def decode_from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids


def build(args: argparse.Namespace):
    spec = {"grid": [16, 16], "depth": None, "codebook_size": args.codebook, "continuous_dim": None}
    ours = MaskGITPrior(code_spec=spec, num_classes=None, dim=args.dim, depth=args.depth, heads=args.heads,
                        mlp_ratio=4.0, norm="layernorm", mlp="swiglu", positions="learned", dropout=0.0)
    return ours, build_muse(args)


def count(m: nn.Module) -> int:
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
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--peer-flash", type=int, default=0,
                   help="muse's Attend(flash=...): 0 einsum softmax (its faster on CPU), 1 its chunked flash function")
    p.add_argument("--cases", nargs="+", default=["train", "sample"], choices=["train", "sample"])
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    ours, theirs = build(args)
    print(f"parameters ours {count(ours):,}  muse (without cross-attention) {count(theirs):,}", flush=True)
    opt_ours = ours.configure_optimizers()["optimizer"]  # AdamW, no decay on norms/biases/embeddings
    print(f"our optimizer {type(opt_ours).__name__} fused: {fuse_adam(opt_ours)}")
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05)
    codes = torch.randint(0, args.codebook, (args.batch, 16, 16))
    text = torch.zeros(args.batch, 1, args.dim)
    top_k = -(-args.codebook // 10)  # muse's topk_filter_thres=0.9 keeps ceil(0.1 * V)

    def step_ours() -> None:
        loss = ours.loss(codes, None).loss
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()

    def step_theirs() -> None:
        loss = theirs(codes, text_embeds=text, cond_drop_prob=0.0)
        opt_theirs.zero_grad(set_to_none=True)
        loss.backward()
        opt_theirs.step()

    def sample_ours() -> None:
        out = ours.sample(args.sample_batch, steps=args.steps, top_k=top_k)
        assert out.shape == (args.sample_batch, 16, 16)

    def sample_theirs() -> None:
        out = theirs.generate([""] * args.sample_batch, fmap_size=16, timesteps=args.steps, cond_scale=1,
                              topk_filter_thres=0.9)
        assert out.shape == (args.sample_batch, 16, 16) and int(out.max()) < args.codebook

    cases = {"train": ("training step", step_ours, step_theirs, True),
             "sample": (f"sampling {args.steps} steps", sample_ours, sample_theirs, False)}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case in args.cases:
            name, mine, peer, mode = cases[case]
            ours.train(mode)
            theirs.train(mode)
            interleaved_ratio(mine, peer, args.rounds, f"threads {threads}: {name}", "muse")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        torch.set_num_threads(args.threads[0])
        for case in args.cases:
            name, mine, peer, mode = cases[case]
            for who, fn in (("ours", mine), ("muse", peer)):
                ours.train(mode)
                theirs.train(mode)
                wall = timed(fn)  # unprofiled (and a warm-up)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    fn()
                events = prof.key_averages()
                ops = sum(e.self_cpu_time_total for e in events) / 1e6
                print(f"--- {who} {name}: wall {wall:.3f} s, operator self time {ops:.3f} s "
                      f"(the rest, {wall - ops:.3f} s, is Python and dispatch outside operators)")
                print(events.table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
