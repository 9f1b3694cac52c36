"""Sparse upcycling (Komatsuzaki et al. 2022) against an MoE trained from scratch, on our AR prior.

    OMP_NUM_THREADS=1 nice -n 10 python bench/moe_upcycle.py --codes CODES --s1 300 --s2 300 --seeds 0 1 \
        --save-dir /tmp/moe_upcycle --out bench/results/moe_upcycle.json

CODES is a Fashion-MNIST code folder (7x7 codes of 512, labels). Every model is the class-conditional
AR prior of :mod:`stage2.ar` (width ``--dim``, ``--depth`` blocks, 4 heads, rope1d), trained with its
own ``configure_optimizers`` (AdamW, warm-up + cosine over S1+S2 steps) on the same batches per seed:

- ``dense``: SwiGLU FFN of hidden H (``mlp_ratio`` 3: H = 2 * dim), trained S1 steps, then
  ``dense_cont``: the same run continued S2 steps (same optimizer; S1+S2 dense steps in all);
- ``upcycled``: the dense model at S1 with every FFN copied into E experts + a fresh renormalised
  top-2 router (:func:`layers.moe.upcycle_transformer`), trained S2 more steps (a fresh AdamW; the
  learning rate continues the same schedule from step S1);
- ``scratch``: the same MoE shape (E experts of hidden H, top-2, the same router) from random init,
  S1+S2 steps (equal steps; more FLOPs than the upcycled path, whose first S1 steps are dense);
- ``dense_active``: a dense FFN of hidden 2H (the MoE's active width), S1+S2 steps: the contrast
  model for ``bench/moe_lowbit.py``, and MoE vs dense at equal active FLOPs.

Reported per seed: validation NLL (exact AR NLL, nats per token, all validation items), the NLL of
the upcycled model at step 0 (must equal the dense model's), parameters, and the training FLOPs of
each phase (matmul FLOPs, 3x the forward: see :func:`flops_per_token`). ``--save-dir`` keeps the
final models (state dict + constructor arguments) for ``bench/moe_lowbit.py`` and ``bench/moe_merge.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's packages (and bench/)

import torch  # noqa: E402

from bench.moe_study import count_parameters, load_split  # noqa: E402
from layers.moe import upcycle_transformer  # noqa: E402
from stage2.ar import ARPrior  # noqa: E402

EXPERTS, TOP_K = 8, 2
ROUTER = {"target": "layers.moe.TopKRouter", "params": {"renormalize": True, "balance_weight": 0.01}}


def model_args(args: argparse.Namespace, data: dict[str, Any], ffn: str) -> dict[str, Any]:
    """Constructor arguments of one variant: ``ffn`` is "dense" (hidden H), "dense2x" (2H) or "moe"."""
    kw: dict[str, Any] = dict(code_spec=data["spec"], num_classes=data["num_classes"], dim=args.dim,
                              depth=args.depth, heads=4, dropout=0.0, lr=args.lr, warmup_steps=args.warmup,
                              max_steps=args.s1 + args.s2, mlp_ratio=3.0)
    if ffn == "dense2x":
        kw["mlp_ratio"] = 6.0
    elif ffn == "moe":
        kw["ffn"] = {"target": "layers.moe.MoE", "params": {"num_experts": EXPERTS, "top_k": TOP_K,
                                                            "hidden_dim": 2 * args.dim, "router": ROUTER}}
    return kw


def flops_per_token(dim: int, depth: int, seq: int, vocab: int, ffn_hidden: int, experts: int = 0) -> float:
    """Training matmul FLOPs per token (3 x forward: forward + two backward products).

    Forward per block: q,k,v,o projections 8 D^2; attention scores and mixing 4 T D (T = seq, full
    length, an upper bound for the causal half); SwiGLU FFN 6 D H per active FFN (top-2: twice);
    router 2 D E. Plus the output head 2 D V.
    """
    ffn = 6 * dim * ffn_hidden * (TOP_K if experts else 1) + (2 * dim * experts if experts else 0)
    block = 8 * dim * dim + 4 * seq * dim + ffn
    return 3.0 * (depth * block + 2 * dim * vocab)


@torch.no_grad()
def validation_nll(model: ARPrior, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Exact AR NLL (nats per token) over the whole split."""
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        total += float(model.loss(x[i:i + batch], y[i:i + batch]).nll) * len(x[i:i + batch])
    model.train(was)
    return total / len(x)


class Trainer:
    """The project's training step (loss + aux_loss, clip 1.0) over a fixed batch order."""

    def __init__(self, model: ARPrior, skip_schedule: int = 0) -> None:
        self.model = model
        cfg = model.configure_optimizers()
        self.opt, self.sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
        for _ in range(skip_schedule):  # continue the learning-rate schedule from that step
            self.sched.step()
        self.seconds = 0.0

    def train(self, xt: torch.Tensor, yt: torch.Tensor, steps: int, order: torch.Generator, batch: int) -> None:
        for _ in range(steps):
            idx = torch.randint(0, len(xt), (batch,), generator=order)
            t0 = time.perf_counter()
            out = self.model.loss(xt[idx], self.model.drop_labels(yt[idx]))
            loss = out.loss + out.aux["aux_loss"] if "aux_loss" in out.aux else out.loss
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.seconds += time.perf_counter() - t0


def run_seed(seed: int, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    xt, yt = data["train"]
    xv, yv = data["val"]
    s1, s2, b = args.s1, args.s2, args.batch_size
    res: dict[str, Any] = {"seed": seed}

    # dense S1, then (a) continued S2, (b) upcycled + S2; the order generator is cloned at S1 so both
    # continuations see the same batches.
    torch.manual_seed(seed)
    dense = ARPrior(**model_args(args, data, "dense"))
    order = torch.Generator().manual_seed(seed)
    dense_tr = Trainer(dense)
    dense_tr.train(xt, yt, s1, order, b)
    res["dense_s1"] = validation_nll(dense, xv, yv)
    order_at_s1 = order.get_state()

    torch.manual_seed(seed + 1000)  # the fresh routers
    upcycled = copy.deepcopy(dense)
    replaced = upcycle_transformer(upcycled, EXPERTS, TOP_K, router=ROUTER)
    res["upcycled_step0"] = validation_nll(upcycled, xv, yv)
    res["upcycled_step0_minus_dense"] = res["upcycled_step0"] - res["dense_s1"]
    up_tr = Trainer(upcycled, skip_schedule=s1)
    up_tr.train(xt, yt, s2, torch.Generator().set_state(order_at_s1), b)
    res["upcycled"] = validation_nll(upcycled, xv, yv)

    dense_tr.train(xt, yt, s2, torch.Generator().set_state(order_at_s1), b)
    res["dense_cont"] = validation_nll(dense, xv, yv)

    torch.manual_seed(seed)
    scratch = ARPrior(**model_args(args, data, "moe"))
    scratch_tr = Trainer(scratch)
    scratch_tr.train(xt, yt, s1 + s2, torch.Generator().manual_seed(seed), b)
    res["scratch"] = validation_nll(scratch, xv, yv)

    torch.manual_seed(seed)
    dense2x = ARPrior(**model_args(args, data, "dense2x"))
    d2_tr = Trainer(dense2x)
    d2_tr.train(xt, yt, s1 + s2, torch.Generator().manual_seed(seed), b)
    res["dense_active"] = validation_nll(dense2x, xv, yv)

    res["seconds"] = {"dense_s1_s2": dense_tr.seconds, "upcycled_s2": up_tr.seconds,
                      "scratch": scratch_tr.seconds, "dense_active": d2_tr.seconds}
    res["parameters"] = {"dense": count_parameters(dense), "moe": count_parameters(upcycled),
                         "scratch": count_parameters(scratch), "dense_active": count_parameters(dense2x)}
    res["ffns_upcycled"] = replaced
    if args.save_dir is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)
        for name, model, ffn in (("upcycled", upcycled, "moe"), ("scratch", scratch, "moe"),
                                 ("dense_cont", dense, "dense"), ("dense_active", dense2x, "dense2x")):
            torch.save({"args": model_args(args, data, ffn), "state_dict": model.state_dict()},
                       args.save_dir / f"{name}_seed{seed}.pt")
    print(f"seed {seed}: dense@S1 {res['dense_s1']:.4f}  upcycled@0 {res['upcycled_step0']:.4f} "
          f"(diff {res['upcycled_step0_minus_dense']:+.2e})  dense_cont {res['dense_cont']:.4f}  "
          f"upcycled {res['upcycled']:.4f}  scratch {res['scratch']:.4f}  dense_active {res['dense_active']:.4f}  "
          f"s: {res['seconds']}", flush=True)
    return res


def load_saved(path: Path) -> ARPrior:
    """A model saved by ``--save-dir`` (constructor arguments + state dict), in eval mode."""
    saved = torch.load(path, weights_only=True)
    model = ARPrior(**saved["args"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def load_data(codes: Path) -> dict[str, Any]:
    manifest = json.loads((codes / "manifest.json").read_text())
    xv, yv = load_split(codes, "val")
    num_classes = manifest.get("num_classes") or int(yv.max()) + 1
    return {"spec": manifest["code_spec"], "num_classes": num_classes, "train": load_split(codes, "train"),
            "val": (xv, yv)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=Path, required=True)
    ap.add_argument("--s1", type=int, default=300)
    ap.add_argument("--s2", type=int, default=300)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--save-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe_upcycle.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data(args.codes)
    seq, vocab, h = 49, data["spec"]["codebook_size"], 2 * args.dim
    tokens = args.batch_size * seq
    f_dense = flops_per_token(args.dim, args.depth, seq, vocab, h)
    f_moe = flops_per_token(args.dim, args.depth, seq, vocab, h, EXPERTS)
    f_d2 = flops_per_token(args.dim, args.depth, seq, vocab, 2 * h)
    flops = {"dense_per_step": f_dense * tokens, "moe_per_step": f_moe * tokens, "dense_active_per_step": f_d2 * tokens,
             "dense_cont_total": f_dense * tokens * (args.s1 + args.s2),
             "upcycled_total": (f_dense * args.s1 + f_moe * args.s2) * tokens,
             "scratch_total": f_moe * tokens * (args.s1 + args.s2),
             "dense_active_total": f_d2 * tokens * (args.s1 + args.s2)}
    print(json.dumps(flops))
    results = []
    for seed in args.seeds:
        results.append(run_seed(seed, data, args))
        summary = {k: {"mean": statistics.mean(r[k] for r in results),
                       "std": statistics.stdev(r[k] for r in results) if len(results) > 1 else 0.0}
                   for k in ("dense_s1", "upcycled_step0", "dense_cont", "upcycled", "scratch", "dense_active")}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "flops": flops,
                                        "runs": results, "summary": summary}, indent=1))
    for k, s in summary.items():
        print(f"{k:16s} {s['mean']:.4f} ± {s['std']:.4f}")


if __name__ == "__main__":
    main()
