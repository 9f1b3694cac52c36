"""Normalisation layers chosen by name, so a config says ``norm: rmsnorm`` instead of a class path."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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


class AdaptiveNorm(nn.Module):
    """AdaLN: a norm without its own affine, scaled and shifted by a per-sample condition vector.

    ``norm(x) * (1 + scale(c)) + shift(c)`` with ``(scale, shift) = Linear(SiLU(c))``, as the
    timestep (and class) injection of VQ-Diffusion and DiT. The projection starts at zero, so an
    untrained block is the plain norm and the condition is learnt in.
    """

    def __init__(self, kind: str, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        if kind == "rmsnorm":
            self.norm: nn.Module = nn.RMSNorm(dim, eps=eps, elementwise_affine=False)
        elif kind == "layernorm":
            self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        else:
            raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """``x`` ``(B, T, D)``, ``cond`` ``(B, cond_dim)``."""
        scale, shift = self.modulation(cond).unsqueeze(1).chunk(2, dim=-1)
        return torch.addcmul(shift, self.norm(x), 1 + scale)
