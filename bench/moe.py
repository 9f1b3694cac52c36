"""MoE layer speed: forward+backward of one layer vs a dense FFN of equal active parameters.

Setup: 8 experts, top-2, d_model 256, expert hidden 1024 (SwiGLU), 8192 tokens as 32 sequences of
256, against a dense SwiGLU FFN of hidden 2048 (same active parameters and FLOPs). Peers:
``st-moe-pytorch`` (GEGLU experts of the same hidden size) and lucidrains' ``mixture-of-experts``
(its experts are plain GELU MLPs, so hidden 1536 gives the same parameters), both configured to
drop nothing: second expert always used (threshold 0 / policy "all"), capacity = whole sequence.
Our layer runs by default as one padded batched matmul when padding every expert to the largest
count costs at most 15% extra rows (else a loop of per-expert ``torch.mm``); both are shown, plus
``torch._grouped_mm`` where the build has it. Then every router of ``layers.moe`` in the layer.
Candidates run interleaved, round-robin, and the figures are medians (the 2 cores are shared);
the ratio column is the median over rounds of (candidate time / dense time of the same round),
robust to load drifting between rounds.

Run: ``python bench/moe.py [--rounds 7] [--threads 2] [--only NAME,...]``. Install peers with
``pip install --no-deps st-moe-pytorch mixture-of-experts beartype colt5-attention local-attention
hyper-connections`` (einops is needed too); a peer that is missing is reported and skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from layers.moe import PEER, DeepSeekMoE, MoE, MultiHeadMoE  # noqa: E402

E, K, D, H, B, T = 8, 2, 256, 1024, 32, 256
OURS = "ours: TopKRouter (default: bmm if padding<=15%)"


class DenseSwiGLU(nn.Module):
    """The baseline: a dense SwiGLU FFN (input projections fused, as a good dense FFN is written)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(g) * u)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def build_candidates() -> tuple[dict[str, nn.Module], list[str]]:
    notes: list[str] = []
    mods: dict[str, nn.Module] = {"dense FFN (hidden 2048)": DenseSwiGLU(D, K * H)}

    def moe(router: str, **params) -> MoE:
        return MoE(D, E, K, H, router={"target": f"layers.moe.{router}", "params": params})

    mods[OURS] = moe("TopKRouter")
    mods["ours: TopKRouter, mm loop only"] = MoE(D, E, K, H, max_padding=None)
    if hasattr(torch, "_grouped_mm"):
        mods["ours: TopKRouter, torch._grouped_mm only"] = MoE(D, E, K, H, max_padding=None, grouped_mm=True)
    else:
        notes.append("torch._grouped_mm: not in this torch build")
    try:
        from st_moe_pytorch import MoE as STMoE

        mods["peer: st-moe-pytorch"] = STMoE(D, num_experts=E, expert_hidden_mult=H * 3 / (2 * D), gating_top_n=K,
                                              threshold_train=0.0, threshold_eval=0.0,
                                              capacity_factor_train=float(E), capacity_factor_eval=float(E))
    except Exception as err:  # noqa: BLE001 - a peer that cannot be built is reported, not fatal
        notes.append(f"peer st-moe-pytorch: cannot be installed/constructed ({type(err).__name__}: {err})")
    try:
        from mixture_of_experts import MoE as LucidMoE

        mods["peer: mixture-of-experts"] = LucidMoE(D, num_experts=E, hidden_dim=3 * H // 2, activation=nn.GELU,
                                                     second_policy_train="all", second_policy_eval="all",
                                                     second_threshold_train=0.0, second_threshold_eval=0.0,
                                                     capacity_factor_train=float(E), capacity_factor_eval=float(E))
    except Exception as err:  # noqa: BLE001
        notes.append(f"peer mixture-of-experts: cannot be installed/constructed ({type(err).__name__}: {err})")
    mods["router AuxFreeRouter"] = moe("AuxFreeRouter")
    mods["router TopKRouter top-1 (1 expert/token)"] = MoE(D, E, 1, H)
    mods["router ExpertChoiceRouter (cf 2)"] = moe("ExpertChoiceRouter", capacity_factor=2.0)
    mods["router SoftMoERouter (64 slots/expert)"] = moe("SoftMoERouter", slots_per_expert=2 * T // E)
    mods["router ReLURouter (at init)"] = moe("ReLURouter")
    mods["router TopAnyRouter (at init)"] = moe("TopAnyRouter")
    mods["router MoEPlusPlusRouter (1 zero,1 copy,2 const)"] = moe("MoEPlusPlusRouter")
    mods["ours: shared expert + TopKRouter"] = MoE(D, E, K, H, num_shared=1)
    # Issue 21's layers at the same active parameters (PEER excepted: it has no dense equivalent).
    mods["router SparseMixerRouter (GRIN, top-2)"] = moe("SparseMixerRouter")
    mods["router StableMoERouter (stage 1, top-1)"] = MoE(D, E, 1, H, router={"target": "layers.moe.StableMoERouter"})
    mods["DeepSeekMoE (32 experts of 256, 7 routed + 1 shared)"] = DeepSeekMoE(D, E, K, H, granularity=4, num_shared=1)
    mods["MultiHeadMoE (4 heads of 64, top-2, hidden 1024)"] = MultiHeadMoE(D, heads=4, num_experts=E, top_k=K,
                                                                           hidden_dim=H)
    mods["PEER (128^2 experts, 8 heads x top-16; 128 neurons)"] = PEER(D, num_experts=128**2, top_k=16, heads=8)
    return mods, notes


def step(mod: nn.Module, x: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        x.grad = None
        mod.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        _first(mod(x)).square().mean().backward()
        return time.perf_counter() - t0

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--only", default="", help="comma-separated substrings of candidate names to keep")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mods, notes = build_candidates()
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        mods = {k: v for i, (k, v) in enumerate(mods.items()) if i == 0 or any(s in k for s in keep)}
    x = torch.randn(B, T, D, requires_grad=True)
    runs = {}
    for name, mod in mods.items():
        mod.train()
        try:
            runs[name] = step(mod, x)
            runs[name]()  # warm-up
        except Exception as err:  # noqa: BLE001
            notes.append(f"{name}: failed to run ({type(err).__name__}: {err})")
            runs.pop(name, None)
    times = {n: [] for n in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(run())
    base_name = next(iter(runs))
    base = times[base_name]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {B}x{T} tokens, d {D}, "
          f"{E} experts top-{K}, expert hidden {H}, fwd+bwd, {args.rounds} interleaved rounds")
    for n in notes:
        print("note:", n)
    print(f"{'candidate':52s} {'median s':>9s} {'x dense':>8s}")
    for name, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        print(f"{name:52s} {statistics.median(ts):9.3f} {ratio:8.2f}")
    if OURS in times:
        for peer in [n for n in times if n.startswith("peer:")]:
            speedup = statistics.median(p / o for p, o in zip(times[peer], times[OURS]))
            print(f"speed-up of ours (default) over {peer[6:]}: {speedup:.2f}x")


if __name__ == "__main__":
    main()
