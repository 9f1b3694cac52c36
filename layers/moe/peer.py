"""PEER (He 2024, "Mixture of A Million Experts"): product-key retrieval over many tiny experts.

The pool holds ``N = n^2`` experts, each a single hidden neuron ``e_i(x) = act(u_i . x) v_i``
(``u_i, v_i`` in R^D, stored as two embedding tables). Each of ``heads`` query networks maps x to
``q = [q1; q2]`` (two halves of ``key_dim``); expert ``i = a * n + b`` has the product key
``[c_a; c'_b]``, so its score is ``q . k_i = q1 . c_a + q2 . c'_b``. The top-k of all N scores is
found exactly from the top-k of each half (the best pair sums lie among the k x k pairs of the
halves' top-k), in ``O(n + k^2)`` instead of ``O(N)`` per query. Gates are the softmax of the k
retrieved scores, and the heads' outputs add up:

    f(x) = sum_h sum_{i in top-k(q_h)} softmax(q_h . k)_i act(u_i . x) v_i

The retrieved experts are gathered by index (an embedding lookup): no tokens x experts tensor is
built. YAML: ``ffn: {target: layers.moe.PEER, params: {num_experts: 1024, top_k: 16, heads: 4}}``.
The paper also batch-normalises the queries; ``query_norm=True`` adds that.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class PEER(nn.Module):
    """Parameter-efficient expert retrieval layer: ``forward(x (..., D)) -> (y, aux)``."""

    causal_safe = True  # per token (the optional query BatchNorm uses batch statistics in training)

    def __init__(self, dim: int, num_experts: int = 1024, top_k: int = 16, heads: int = 4,
                 key_dim: int | None = None, activation: str = "gelu", query_norm: bool = False) -> None:
        super().__init__()
        n = math.isqrt(num_experts)
        if n * n != num_experts:
            raise ValueError(f"num_experts must be a square (product keys), got {num_experts}")
        if not 1 <= top_k <= n:
            raise ValueError(f"top_k must be in [1, sqrt(num_experts)={n}], got {top_k}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        key_dim = key_dim or dim
        if key_dim % 2:
            raise ValueError(f"key_dim must be even (two halves), got {key_dim}")
        self.dim, self.num_experts, self.n, self.top_k, self.heads = dim, num_experts, n, top_k, heads
        self.key_dim, self.activation = key_dim, activation
        self.query = nn.Linear(dim, heads * key_dim, bias=False)
        self.query_norm = nn.BatchNorm1d(heads * key_dim) if query_norm else None
        self.sub_keys = nn.Parameter(torch.randn(2, n, key_dim // 2) * (key_dim // 2) ** -0.5)
        self.down = nn.Embedding(num_experts, dim)  # u_i
        self.up = nn.Embedding(num_experts, dim)  # v_i
        nn.init.uniform_(self.down.weight, -dim**-0.5, dim**-0.5)
        nn.init.uniform_(self.up.weight, -dim**-0.5, dim**-0.5)

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per token and head, the indices (N, H, k) and scores (N, H, k) of the top-k experts."""
        q = self.query(x.reshape(-1, self.dim))
        if self.query_norm is not None:
            q = self.query_norm(q)
        q = q.view(-1, self.heads, 2, self.key_dim // 2)
        half = torch.einsum("nhpd,pkd->nhpk", q, self.sub_keys)  # (N, H, 2, n): scores of each half
        s1, i1 = half[:, :, 0].topk(self.top_k, dim=-1)
        s2, i2 = half[:, :, 1].topk(self.top_k, dim=-1)
        pair = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (N, H, k*k)
        scores, best = pair.topk(self.top_k, dim=-1)
        idx = i1.gather(-1, best // self.top_k) * self.n + i2.gather(-1, best % self.top_k)
        return idx, scores

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        shape = x.shape
        xf = x.reshape(-1, self.dim)
        idx, scores = self.retrieve(xf)
        n = xf.shape[0]
        gates = scores.softmax(-1)
        flat = idx.reshape(n, -1)  # (N, H*k): every head's experts of a token
        h = ACTIVATIONS[self.activation](torch.bmm(self.down(flat), xf.unsqueeze(-1)).squeeze(-1))
        # The weighted sum of the v_i as one embedding bag: the (N, H*k, D) gather of v is never built.
        y = F.embedding_bag(flat, self.up.weight, per_sample_weights=(gates.reshape(n, -1) * h).to(xf.dtype),
                            mode="sum")
        with torch.no_grad():
            load = torch.bincount(idx.flatten(), minlength=self.num_experts).float()
            aux = {"loss": xf.new_zeros(()), "experts_used_fraction": (load > 0).float().mean(),
                   "gate_entropy": -(gates * gates.clamp_min(1e-12).log()).sum(-1).mean()}
        return y.reshape(shape), aux
