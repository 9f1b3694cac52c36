"""The default feed-forward block of a transformer layer (the "FFN slot" that MoE can replace)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

MLPS = ("swiglu", "gelu")


class MLP(nn.Module):
    """Position-wise feed-forward network: SwiGLU (gated, fused gate/up projection) or GELU.

    For SwiGLU the hidden width is ``2/3 * mlp_ratio * dim`` rounded up to a multiple of 8, which
    keeps the parameter count equal to a GELU MLP of the same ratio (the gate adds a third matrix).
    Works on any token count, including ``(B, 1, D)`` during cached decoding.
    """

    causal_safe = True  # purely per-token: never looks at other positions

    def __init__(self, dim: int, mlp_ratio: float = 4.0, kind: str = "swiglu", dropout: float = 0.0):
        super().__init__()
        if kind not in MLPS:
            raise ValueError(f"unknown mlp {kind!r}; choose one of {', '.join(MLPS)}")
        self.kind = kind
        if kind == "swiglu":
            hidden = int(2 * mlp_ratio * dim / 3)
            hidden = 8 * ((hidden + 7) // 8)
            self.w_in = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up in one GEMM
            self.w_out = nn.Linear(hidden, dim, bias=False)
        else:
            hidden = int(mlp_ratio * dim)
            self.w_in = nn.Linear(dim, hidden)
            self.w_out = nn.Linear(hidden, dim)
        self.hidden = hidden
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w_in(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.drop(self.w_out(h))
