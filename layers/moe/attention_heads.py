"""Mixture of Attention Heads (Zhang et al. 2022, "MoA: Mixture of Attention Heads: Selecting
Attention Heads Per Token"): experts in the attention layer.

There are ``num_experts`` attention heads; head i owns a query projection ``W_q^i`` (D x d_h) and
an output projection ``W_o^i`` (d_h x D); the key and value projections ``W_k, W_v`` (D x d_h) are
shared by all heads, so keys and values are computed once. A router picks k heads per token:

    w_t = softmax(top-k(x_t W_g))                       (renormalised over the k chosen)
    y_t = sum_{i in top-k} w_{t,i} softmax(x_t W_q^i (X W_k)^T / sqrt(d_h)) (X W_v) W_o^i

with Switch's balance loss ``E sum_i f_i P_i`` and the router z-loss, as in the paper. The
per-head projections run on the assignments sorted by head (one matmul per head on its slice);
no tokens x heads one-hot is built. Causal or bidirectional.

It fills the attention slot of :class:`~layers.transformer.Transformer` (``attention:`` spec): the
forward takes the slot's ``(x, rotary, cache, layer)``. Rotary positions rotate the queries of the
chosen heads and the one shared key head; with a KV cache the shared key/value head is what is
cached (it is written into the layer's cache buffers, whose head dimension must equal ``head_dim``),
so a decoding step computes one key/value row per token, not one per chosen head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.kv_cache import KVCache
from layers.positions import Rotary

from .router_losses import balance_loss, entropy, load_fraction, z_loss


def _per_expert_matmul(rows: Tensor, weights: Tensor, expert: Tensor) -> Tensor:
    """``rows[a] @ weights[expert[a]]`` for every row: sort by expert, one matmul per slice, un-sort."""
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=weights.shape[0]).tolist()
    sorted_rows = rows.index_select(0, order)
    out, start = [], 0
    for e, c in enumerate(counts):
        if c:
            out.append(sorted_rows[start:start + c] @ weights[e])
        start += c
    result = torch.cat(out) if out else rows.new_zeros(0, weights.shape[-1])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return result.index_select(0, inverse)


class MixtureOfAttentionHeads(nn.Module):
    """MoA self-attention: ``forward(x (B, T, D)) -> (y (B, T, D), aux)``."""

    def __init__(self, dim: int, num_experts: int = 8, top_k: int = 2, head_dim: int = 64, causal: bool = True,
                 balance_weight: float = 0.01, z_loss_weight: float = 1e-3) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.dim, self.num_experts, self.top_k, self.head_dim = dim, num_experts, top_k, head_dim
        self.causal, self.balance_weight, self.z_loss_weight = causal, balance_weight, z_loss_weight
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_q = nn.Parameter(torch.empty(num_experts, dim, head_dim))
        self.w_o = nn.Parameter(torch.empty(num_experts, head_dim, dim))
        self.w_kv = nn.Linear(dim, 2 * head_dim, bias=False)
        nn.init.uniform_(self.w_q, -dim**-0.5, dim**-0.5)
        nn.init.uniform_(self.w_o, -head_dim**-0.5, head_dim**-0.5)

    @property
    def causal_safe(self) -> bool:
        return self.causal

    def forward(self, x: Tensor, rotary: Rotary | None = None, cache: KVCache | None = None,
                layer: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        b, t, d = x.shape
        k = self.top_k
        xf = x.reshape(b * t, d)
        logits = F.linear(xf.float(), self.router.weight.float())
        probs = logits.softmax(-1)
        top_logit, head = logits.topk(k, dim=-1)
        gate = top_logit.softmax(-1)  # softmax over the k chosen = renormalised top-k probabilities
        q = _per_expert_matmul(xf.repeat_interleave(k, 0), self.w_q, head.reshape(-1))  # (B*T*k, d_h)
        q = q.view(b, t, k, self.head_dim).transpose(1, 2)  # the k chosen heads act as k query heads
        key, value = self.w_kv(x).unsqueeze(1).chunk(2, dim=-1)  # shared: (B, 1, T, d_h) each
        offset = cache.length if cache is not None else 0
        if rotary is not None:
            q, key = rotary.rotate(q, offset), rotary.rotate(key, offset)
        mask, causal = None, self.causal
        if cache is not None:
            # the cache's buffers have the transformer's head count; the one shared head is read back
            # from head 0 (the write broadcasts it, which costs a copy, not a recomputation)
            key, value = (c[:, :1] for c in cache.update(layer, key, value))
            causal = False
            if self.causal and t > 1:  # a prefill: queries at offset.., keys from 0
                q_pos = torch.arange(offset, offset + t, device=x.device)
                mask = torch.arange(offset + t, device=x.device)[None, :] <= q_pos[:, None]
        attn = F.scaled_dot_product_attention(q, key.expand(-1, k, -1, -1), value.expand(-1, k, -1, -1),
                                              attn_mask=mask, is_causal=causal)  # (B, k, T, d_h)
        o = attn.transpose(1, 2).reshape(b * t * k, self.head_dim)
        y = _per_expert_matmul(o, self.w_o, head.reshape(-1)).view(b * t, k, d)
        y = (y * gate.to(y.dtype).unsqueeze(-1)).sum(1)
        load = load_fraction(head.reshape(-1), self.num_experts)
        bal, zl = balance_loss(load, probs.mean(0)), z_loss(logits)
        aux = {"loss": self.balance_weight * bal + self.z_loss_weight * zl, "load": load.detach(),
               "router_entropy": entropy(probs), "balance_loss": bal.detach(), "z_loss": zl.detach()}
        return y.view(b, t, d), aux
