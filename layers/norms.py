"""Normalisation layers chosen by name, so a config says ``norm: rmsnorm`` instead of a class path."""

from __future__ import annotations

from torch import nn

NORMS = ("rmsnorm", "layernorm")


def make_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """Return an ``nn.RMSNorm`` (no mean subtraction, as in LLaMA-style priors) or an ``nn.LayerNorm``.

    Both are torch's own fused implementations; RMSNorm keeps a learnable scale and no bias.
    """
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")
