"""Logit processing shared by the priors' samplers: temperature, top-k, nucleus (top-p), CFG.

Guidance convention (used by every prior of this package)::

    guided = cond + scale * (cond - uncond)

so ``scale = 0`` is exactly conditional sampling without guidance (the unconditional branch is not
even computed), and ``scale = s`` equals the other common form ``uncond + (1 + s)(cond - uncond)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Mask with ``-inf`` all but the ``top_k`` largest logits, then all outside the nucleus ``top_p``.

    Works over the last axis. The nucleus is the smallest set of most likely tokens whose
    probability mass reaches ``top_p`` (computed after top-k); the most likely token is always kept,
    so at least one token survives for any ``top_k >= 1`` and ``top_p > 0``. Ties at the top-k
    boundary are all kept.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # mass strictly before each token; a token is dropped when that mass already reaches top_p
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(
    logits: Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Draw one token per row of ``logits`` ``(..., V)``; returns indices ``(...)``.

    ``temperature = 0`` is greedy (argmax). Otherwise logits are divided by the temperature, then
    filtered by :func:`filter_logits`, then sampled with ``generator`` (for reproducible draws).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    idx = torch.multinomial(flat, 1, generator=generator)
    return idx.view(probs.shape[:-1])


def cfg_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``cond + scale * (cond - uncond)``; ``scale = 0`` returns ``cond`` itself."""
    if scale == 0:
        return cond
    return cond + scale * (cond - uncond)
