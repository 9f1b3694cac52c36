"""What a router hands to the MoE layer, and the statistics/losses several routers share.

A sparse router returns its decision as a flat list of assignments ``(token, expert, gate)``:
top-k gives ``N*k`` of them, expert-choice ``E*c``, ReLU and top-any a variable number. The layer
sorts that list by expert and never builds a dense tokens x experts x capacity tensor. A router may
also hand back ``extra`` (N, D): output it computed itself (MoE++'s zero-computation experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Routing:
    """One routing decision over ``N`` flattened tokens.

    ``token_idx``, ``expert_idx`` (LongTensor (A,)) and ``gate`` (float (A,), differentiable) list
    every token-expert assignment. ``loss`` is the router's already-weighted auxiliary loss (a
    scalar), ``stats`` holds extra values to log (detached). ``load`` is the fraction of
    assignments per choice, over every choice the router has (FFN experts and, for MoE++, the
    zero-computation ones). ``extra`` is output computed by the router itself, added as it is.
    ``k_per_token`` = k when the assignments are exactly ``k`` per token in token-major order
    (``token_idx == arange(N).repeat_interleave(k)``): the layer then gathers and combines by
    permutation instead of scatter-add.
    """

    token_idx: Tensor
    expert_idx: Tensor
    gate: Tensor
    loss: Tensor
    load: Tensor
    entropy: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)
    extra: Tensor | None = None
    k_per_token: int | None = None


def load_fraction(expert_idx: Tensor, num_choices: int) -> Tensor:
    """Fraction of assignments that went to each choice; uniform zeros-safe when nothing is routed."""
    counts = torch.bincount(expert_idx, minlength=num_choices).float()
    return counts / counts.sum().clamp_min(1.0)


def balance_loss(load: Tensor, mean_prob: Tensor, weights: Tensor | None = None) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i * P_i``.

    ``load`` f_i is the fraction of assignments to expert i (no gradient: it comes from an argmax),
    ``mean_prob`` P_i the router probability averaged over tokens (carries the gradient). With
    uniform routing both are 1/E and the loss is exactly 1, its minimum for a fixed P; skew raises
    it. ``weights`` scales experts individually (MoE++'s tau for zero-computation experts).
    """
    terms = load.detach() * mean_prob
    if weights is not None:
        terms = terms * weights
    return load.numel() * terms.sum()


def z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean squared log-partition, keeps router logits small and stable."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def entropy(probs: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of each token's distribution over experts."""
    p = probs.float().clamp_min(1e-12)
    return -(p * p.log()).sum(-1).mean().detach()
