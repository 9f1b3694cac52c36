"""Merging experts after training by their routing policy: the "merge" half of MC-SMoE (Li et al.
2024, "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy").

1. :func:`group_experts` runs the router on calibration tokens and records each expert's usage
   frequency ``f`` and its router-logit column; expert similarity is ``(cos(l_i, l_j) + 1) / 2``
   of those columns. The ``num_groups`` most used experts are the *dominant* ones, one per group;
   every other expert joins the group of its most similar dominant expert.
2. :func:`merge_groups` aligns every member's hidden units to its group's dominant expert (a
   permutation found by weight matching: the assignment maximising the inner products of the
   units' input and output weights, as the authors do before merging), then replaces the group by
   the usage-weighted average ``sum_i f_i W_i / sum_i f_i``.

The router is left as it is: each router choice maps to its group's merged expert through the
layer's ``expert_map``, so a token that chose two members of a group gets the merged expert with
the sum of their gates. Merging identical experts therefore changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .experts import StackedExperts
from .layer import MoE


def router_logits(moe: MoE, x: Tensor) -> Tensor:
    """The router's logits over its FFN experts for flattened tokens (N, E)."""
    proj = getattr(moe.router, "proj", None)
    if proj is None:
        raise ValueError(f"{moe.router_name} has no linear router (proj) to compare experts by")
    return F.linear(x.reshape(-1, moe.dim).float(), proj.weight.float())[:, :moe.num_experts]


@torch.no_grad()
def group_experts(moe: MoE, calibration: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """MC-SMoE's routing-guided grouping: ``(labels (E,), usage frequency (E,))``."""
    e = moe.num_experts
    if not 1 <= num_groups <= e:
        raise ValueError(f"num_groups must be in [1, {e}], got {num_groups}")
    was_training = moe.training
    moe.eval()
    x = calibration.reshape(-1, calibration.shape[-2], moe.dim) if calibration.dim() > 2 else calibration[None]
    usage = torch.bincount(moe.route(x).expert_idx, minlength=moe.router.num_choices)[:e].float()
    usage = usage / usage.sum().clamp_min(1.0)
    logits = router_logits(moe, x)
    sim = (F.cosine_similarity(logits.t()[:, None], logits.t()[None], dim=-1) + 1) / 2
    dominant = torch.argsort(usage, descending=True, stable=True)[:num_groups]
    labels = torch.empty(e, dtype=torch.long)
    labels[dominant] = torch.arange(num_groups)
    for i in range(e):
        if i not in dominant.tolist():
            labels[i] = labels[dominant[sim[i, dominant].argmax()]]
    moe.train(was_training)
    return labels, usage


def _unit_features(experts: StackedExperts, i: int) -> Tensor:
    """Per hidden unit of expert i, its input (gate and up) and output weights: (H, 2D or 3D)."""
    w_in, w_out = experts.w_in[i], experts.w_out[i]  # (D, H or 2H), (H, D)
    parts = list(w_in.t().chunk(2, dim=0)) if experts.activation == "swiglu" else [w_in.t()]
    return torch.cat([*parts, w_out], dim=1)


def _align(experts: StackedExperts, member: int, anchor: int) -> Tensor:
    """Permutation ``p`` of ``member``'s hidden units so that unit ``p[j]`` matches anchor unit j."""
    from scipy.optimize import linear_sum_assignment  # an offline post-training step: scipy is fine here

    score = _unit_features(experts, anchor) @ _unit_features(experts, member).t()  # (H anchor, H member)
    rows, cols = linear_sum_assignment(score.double().cpu().numpy(), maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def _permuted(experts: StackedExperts, i: int, perm: Tensor) -> tuple[Tensor, Tensor]:
    w_in, w_out = experts.w_in[i], experts.w_out[i]
    if experts.activation == "swiglu":
        h = experts.hidden_dim
        w_in = torch.cat([w_in[:, :h][:, perm], w_in[:, h:][:, perm]], dim=1)
    else:
        w_in = w_in[:, perm]
    return w_in, w_out[perm]


@torch.no_grad()
def merge_groups(moe: MoE, labels: Tensor, usage: Tensor | None = None, align: bool = True) -> MoE:
    """Merge the experts of each group in place (usage-weighted; uniform when ``usage`` is None or
    a group was never used) and map every router choice to its group's merged expert."""
    if getattr(moe.router, "soft", False):
        raise ValueError("Soft MoE mixes every expert into every slot; its experts cannot be merged")
    if moe.expert_map is not None:
        raise ValueError("this layer's experts are already merged")
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    e, g = moe.num_experts, int(labels.max()) + 1
    if labels.shape != (e,) or sorted(labels.unique().tolist()) != list(range(g)):
        raise ValueError(f"labels must give each of the {e} experts a group in 0..G-1, every group used")
    old = moe.experts
    usage = torch.ones(e, dtype=torch.float64) if usage is None else usage.double().cpu()
    merged = StackedExperts(moe.dim, g, old.hidden_dim, old.activation, old.use_grouped_mm).to(old.w_in)
    for group in range(g):
        members = (labels == group).nonzero().flatten().tolist()
        anchor = max(members, key=lambda m: usage[m].item())  # the dominant (most used) member
        weights = usage[members] if usage[members].sum() > 0 else torch.ones(len(members), dtype=torch.float64)
        weights = (weights / weights.sum()).to(old.w_in)
        w_in = torch.zeros_like(old.w_in[0])
        w_out = torch.zeros_like(old.w_out[0])
        for w, m in zip(weights, members):
            perm = _align(old, m, anchor) if align and m != anchor else torch.arange(old.hidden_dim)
            m_in, m_out = _permuted(old, m, perm)
            w_in += w * m_in
            w_out += w * m_out
        merged.w_in[group], merged.w_out[group] = w_in, w_out
    moe.experts = merged
    moe.expert_map = labels.to(old.w_in.device)
    return moe
