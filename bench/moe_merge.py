"""MC-SMoE expert merging (layers/moe/merge.py) on trained MoE AR priors: validation NLL before and after.

    OMP_NUM_THREADS=1 nice -n 10 python bench/moe_merge.py --codes CODES --runs /tmp/moe_upcycle --seeds 0 1 \
        --out bench/results/moe_merge.json

RUNS holds the MoE priors ``bench/moe_upcycle.py --save-dir`` saved (8 experts of hidden H, top-2, one
MoE per block). For every MoE layer, calibration tokens are that layer's inputs on ``--calib``
training items; :func:`layers.moe.group_experts` groups the 8 experts into E/2 or E/4 groups by routing
similarity (the most used expert of each group dominant), :func:`layers.moe.merge_groups` aligns each
member's hidden units to its dominant expert and averages them weighted by usage. The router is kept
(each choice maps to its group's merged expert). Contrast: ``naive``, experts grouped at random into
equal groups and averaged uniformly without alignment.

Reported per model and seed: validation NLL (exact AR NLL, nats/token, first ``--limit-val`` items)
before and after, and the parameter count of the model and of its experts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.moe_study import count_parameters  # noqa: E402
from bench.moe_upcycle import load_data, load_saved, validation_nll  # noqa: E402
from layers.moe import MoE, group_experts, merge_groups  # noqa: E402


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[MoE, torch.Tensor]:
    """Each MoE layer's input tokens (B, T, D) on the calibration items."""
    seen: dict[MoE, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp: seen.__setitem__(mod, inp[0].detach()))
             for m in model.modules() if isinstance(m, MoE)]
    model.loss(x, y)
    for h in hooks:
        h.remove()
    return seen


def merge_model_(model: torch.nn.Module, calib: tuple[torch.Tensor, torch.Tensor], groups: int, method: str,
                 seed: int) -> None:
    for moe, tokens in layer_inputs(model, *calib).items():
        if method == "mc-smoe":
            labels, usage = group_experts(moe, tokens, groups)
            merge_groups(moe, labels, usage, align=True)
        else:  # random equal groups, uniform average, no alignment
            g = torch.Generator().manual_seed(seed)
            labels = (torch.randperm(moe.num_experts, generator=g) % groups)
            merge_groups(moe, labels, None, align=False)


def expert_parameters(model: torch.nn.Module) -> int:
    return sum(m.experts.w_in.numel() + m.experts.w_out.numel() for m in model.modules() if isinstance(m, MoE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", type=Path, required=True)
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--models", nargs="+", default=["scratch", "upcycled"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--limit-val", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("bench/results/moe_merge.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data(args.codes)
    xv, yv = (t[:args.limit_val] for t in data["val"])
    xt, yt = data["train"]
    rows = []
    for seed in args.seeds:
        calib = (xt[:args.calib], yt[:args.calib])
        for name in args.models:
            path = args.runs / f"{name}_seed{seed}.pt"
            model = load_saved(path)
            before = validation_nll(model, xv, yv)
            rows.append({"model": name, "seed": seed, "experts": 8, "method": "none", "nll": before, "delta": 0.0,
                         "parameters": count_parameters(model), "expert_parameters": expert_parameters(model)})
            for groups in args.groups:
                for method in ("mc-smoe", "naive"):
                    model = load_saved(path)
                    merge_model_(model, calib, groups, method, seed)
                    nll = validation_nll(model, xv, yv)
                    rows.append({"model": name, "seed": seed, "experts": groups, "method": method, "nll": nll,
                                 "delta": nll - before, "parameters": count_parameters(model),
                                 "expert_parameters": expert_parameters(model)})
                    print(f"seed {seed} {name:9s} 8 -> {groups} {method:8s} NLL {before:.4f} -> {nll:.4f} "
                          f"(+{nll - before:.4f}), {rows[-1]['parameters']:,} parameters", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                           indent=1))


if __name__ == "__main__":
    main()
