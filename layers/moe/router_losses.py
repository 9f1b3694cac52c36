"""Auxiliary losses and routing statistics that several routers share (balance, z-loss, load, entropy)."""

from __future__ import annotations

import torch
from torch import Tensor


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
