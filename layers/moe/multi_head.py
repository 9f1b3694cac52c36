"""Multi-Head Mixture-of-Experts (Wu et al. 2024, "Multi-Head Mixture-of-Experts").

Each token ``x`` (D) is projected by a multi-head layer ``x W_head`` and split into ``heads``
sub-tokens of ``D/heads``; every sub-token is routed on its own to experts that work at width
``D/heads``; the expert outputs are put back in sub-token order, concatenated and mixed by a merge
layer ``W_merge``:

    y = concat_j( MoE(sub_j) ) W_merge,   sub_j = (x W_head)[j D/h : (j+1) D/h]

so a token reaches up to ``heads * top_k`` experts at the compute of ``top_k`` full-width ones.
The inner layer is :class:`~layers.moe.layer.MoE` (any router, sort-based dispatch); YAML:
``ffn: {target: layers.moe.MultiHeadMoE, params: {heads: 4, num_experts: 8, top_k: 2}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .layer import MoE


class MultiHeadMoE(nn.Module):
    """MH-MoE FFN: ``forward(x (..., T, D)) -> (y, aux)``; ``hidden_dim`` is each expert's hidden
    width (default ``4 * D / heads``); other keywords go to the inner :class:`MoE`."""

    def __init__(self, dim: int, heads: int = 4, num_experts: int = 8, top_k: int = 2,
                 hidden_dim: int | None = None, router: Mapping[str, Any] | None = None,
                 activation: str = "swiglu", **moe_params: Any) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"heads {heads} must divide dim {dim}")
        self.dim, self.heads, self.sub_dim = dim, heads, dim // heads
        self.head_proj = nn.Linear(dim, dim, bias=False)
        self.merge_proj = nn.Linear(dim, dim, bias=False)
        self.moe = MoE(self.sub_dim, num_experts, top_k, hidden_dim or 4 * self.sub_dim, router, activation,
                       **moe_params)

    @property
    def causal_safe(self) -> bool:
        return self.moe.causal_safe

    @property
    def router(self) -> nn.Module:
        return self.moe.router

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        shape = x.shape
        t = shape[-2] if x.dim() > 1 else 1
        # Sub-tokens of a token sit next to each other: position order is kept within a sequence.
        sub = self.head_proj(x).reshape(-1, t * self.heads, self.sub_dim)
        y, aux = self.moe(sub)
        return self.merge_proj(y.reshape(shape)), aux
