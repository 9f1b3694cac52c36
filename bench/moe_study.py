"""The router study of "Routers in Vision Mixture of Experts" (Liu et al. 2024) on our MaskGIT prior.

    OMP_NUM_THREADS=1 nice -n 10 python bench/moe_study.py --codes CODES --steps 400 --seeds 0 1 2 \
        --out bench/results/moe_study.json

CODES is a Fashion-MNIST code folder (7x7 codes of 512, e.g. ``scripts/train.py configs/vqvae.yaml``
then ``scripts/tokenize.py``). Every variant is the same class-conditional MaskGIT prior (width 96,
4 blocks, 4 heads by default; ``--dim``/``--depth``) whose FFNs differ, trained the same steps on the
same batches (one seed = one data order and one initialisation, shared by the variants):

- ``dense``: a SwiGLU FFN of hidden 256 (the active size every sparse variant matches);
- ``token_choice``: 8 experts of hidden 128, top-2 token choice (TopKRouter, balance loss 0.01):
  2 x 128 = 256 hidden units per token, the same FLOPs per token as ``dense``;
- ``expert_choice``: the same experts, each expert takes its top ``2 N / 8`` tokens of the batch
  (capacity factor 2: on average 2 experts per token, the same FLOPs);
- ``soft``: Soft MoE, 8 experts of hidden 256 with 6 slots each: 48 slots for 49 tokens, so the
  expert FLOPs per sequence equal the dense FFN's on 48 tokens (the paper's matched-compute setting;
  it has 8x the dense FFN's parameters, as in the paper);
- ``dense_total``: a SwiGLU FFN of hidden 1024: the total parameters of the 8 x 128 experts, 4x the
  FLOPs (MoE against dense at equal total parameters).

Reported: validation masked-token cross-entropy (nats/token) with the same masks for every variant
(fixed seed per batch), at every ``--eval-every`` steps (the dense curve says whether the budget
reached its flat part), mean ± std over seeds; training wall time per variant (relative to dense).
Findings checked: (i) expert-choice < token-choice, (ii) soft < the best sparse router, and MoE vs
dense at equal active and at equal total parameters.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stage2.ar import ARPrior
from stage2.maskgit import MaskGITPrior

DIM, DEPTH, HEADS = 96, 4, 4  # --dim / --depth change them; the FFN sizes follow the width
EXPERTS = 8
PRIORS = {"maskgit": MaskGITPrior, "ar": ARPrior}


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """The hidden width of layers.mlp.MLP's SwiGLU: 2/3 * ratio * dim rounded up to a multiple of 8."""
    return 8 * math.ceil(2 * mlp_ratio * dim / 3 / 8)


def _moe(router: dict[str, Any], hidden: int, top_k: int = 2) -> dict[str, Any]:
    return {"target": "layers.moe.MoE", "params": {"num_experts": EXPERTS, "top_k": top_k, "hidden_dim": hidden,
                                                   "router": router}}


def variants(dim: int) -> dict[str, dict[str, Any]]:
    """FFN specs at width ``dim``: dense hidden H; experts of H/2 (2 active = H); soft experts of H."""
    h = swiglu_hidden(dim)
    return {
        "dense": {"mlp_ratio": 4.0},
        "token_choice": {"ffn": _moe({"target": "layers.moe.TopKRouter", "params": {"balance_weight": 0.01}}, h // 2)},
        "expert_choice": {"ffn": _moe({"target": "layers.moe.ExpertChoiceRouter",
                                       "params": {"capacity_factor": 2.0}}, h // 2)},
        "soft": {"ffn": _moe({"target": "layers.moe.SoftMoERouter", "params": {"slots_per_expert": 6}}, h)},
        "dense_total": {"mlp_ratio": 16.0},  # SwiGLU hidden ~ 8 x H/2: the experts' total parameters
    }


VARIANTS = tuple(variants(DIM))


def load_split(codes: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = json.loads((codes / "manifest.json").read_text())
    shards = manifest["splits"][split]["shards"]
    x = np.concatenate([np.load(codes / s["file"]) for s in shards]).astype(np.int64)
    y = np.concatenate([np.load(codes / s["labels"]) for s in shards]).astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y)


def build(variant: str, spec: dict[str, Any], num_classes: int, args: argparse.Namespace,
          prior: str = "maskgit") -> MaskGITPrior | ARPrior:
    """The study's prior (``prior``: ``maskgit``, or ``ar``, which refuses expert choice and soft MoE)."""
    extra = {"label_smoothing": 0.0} if prior == "maskgit" else {}
    return PRIORS[prior](code_spec=spec, num_classes=num_classes, dim=args.dim, depth=args.depth, heads=HEADS,
                         dropout=0.0, lr=1e-3, warmup_steps=min(50, args.steps // 10), max_steps=args.steps,
                         **extra, **variants(args.dim)[variant])


@torch.no_grad()
def validation_nll(model: MaskGITPrior, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Masked-token cross-entropy (nats/token) on the whole split; the masks depend only on the batch index."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(x), batch):
        torch.manual_seed(10_000 + i)  # the same masks for every variant and every evaluation
        out = model.loss(x[i:i + batch], y[i:i + batch])
        total += float(out.nll) * len(x[i:i + batch])
        n += len(x[i:i + batch])
    model.train()
    return total / n


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run(variant: str, seed: int, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return train_variant(variant, seed, data, args)[1]


def train_variant(variant: str, seed: int, data: dict[str, Any], args: argparse.Namespace,
                  prior: str = "maskgit") -> tuple[MaskGITPrior | ARPrior, dict[str, Any]]:
    """Train one variant for one seed: (the trained prior, its record: curve, final NLL, time, parameters)."""
    torch.manual_seed(seed)
    model = build(variant, data["spec"], data["num_classes"], args, prior)
    configured = model.configure_optimizers()
    opt = configured["optimizer"] if isinstance(configured, dict) else configured[0][0]
    sched = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else configured[1][0]
    xt, yt = data["train"]
    order = torch.Generator().manual_seed(seed)
    curve, train_s = [], 0.0
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(xt), (args.batch_size,), generator=order)
        t0 = time.perf_counter()
        out = model.loss(xt[idx], model.drop_labels(yt[idx]))
        opt.zero_grad(set_to_none=True)
        # the objective Prior.training_step optimises: the routers' aux losses (token choice's balance and
        # z-loss) are in out.aux, not in out.loss; without them token choice trains with no balance loss
        (out.loss + out.aux["aux_loss"] if "aux_loss" in out.aux else out.loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, validation_nll(model, *data["val"])))
    print(f"  {variant:14s} seed {seed}: val NLL {curve[-1][1]:.4f}  ({train_s:.0f} s)", flush=True)
    return model.eval(), {"variant": variant, "seed": seed, "curve": curve, "final": curve[-1][1],
                          "train_s": train_s, "parameters": count_parameters(model)}


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    dense_s = statistics.mean(r["train_s"] for r in by["dense"]) if "dense" in by else math.nan
    summary = {}
    for variant, rs in by.items():
        finals = [r["final"] for r in rs]
        summary[variant] = {"mean": statistics.mean(finals), "std": statistics.stdev(finals) if len(rs) > 1 else 0.0,
                            "seeds": len(rs), "parameters": rs[0]["parameters"],
                            "time_vs_dense": statistics.mean(r["train_s"] for r in rs) / dense_s}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--dim", type=int, default=DIM)
    ap.add_argument("--depth", type=int, default=DEPTH)
    ap.add_argument("--limit-val", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe_study.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    manifest = json.loads((args.codes / "manifest.json").read_text())
    xv, yv = load_split(args.codes, "val")
    data = {"spec": manifest["code_spec"], "num_classes": int(yv.max()) + 1 if manifest.get("num_classes") is None
            else manifest["num_classes"], "train": load_split(args.codes, "train"),
            "val": (xv[:args.limit_val], yv[:args.limit_val])}
    print(f"train {len(data['train'][0])} / val {len(data['val'][0])} items, grid {data['spec']['grid']}, "
          f"K {data['spec']['codebook_size']}, {args.steps} steps x batch {args.batch_size}")
    results = []
    for seed in args.seeds:  # seeds outermost: a cut-short run still has every variant of the first seeds
        for variant in args.variants:
            results.append(run(variant, seed, data, args))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.out.with_suffix(".tmp")
            tmp.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": results,
                                       "summary": summarise(results)}, indent=1))
            tmp.replace(args.out)
    for variant, s in summarise(results).items():
        print(f"{variant:14s} {s['mean']:.4f} ± {s['std']:.4f} nats/token over {s['seeds']} seeds, "
              f"{s['parameters']:,} parameters, {s['time_vs_dense']:.2f}x dense time")


if __name__ == "__main__":
    main()
