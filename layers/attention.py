"""Multi-head self-attention through ``F.scaled_dot_product_attention`` with an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.kv_cache import KVCache
from layers.positions import Rotary


class Attention(nn.Module):
    """Self-attention with a fused qkv projection.

    Without a cache, the causal mask is ``is_causal=True`` (so SDPA picks its fused kernels). With a
    cache, the queries are the new tokens at positions ``offset .. offset+T-1`` and the keys are
    everything written so far; a causal mask is then only needed when more than one new token comes
    in (a prefill), and is built explicitly because ``is_causal`` assumes queries start at 0.
    """

    def __init__(self, dim: int, heads: int, causal: bool, dropout: float = 0.0, qkv_bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        rotary: Rotary | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        offset = cache.length if cache is not None else 0
        if rotary is not None:
            q, k = rotary.rotate(qkv[:2], offset).unbind(0)  # each (B, heads, T, head_dim)
            v = qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        drop = self.dropout if self.training else 0.0
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=self.causal)
        else:
            k, v = cache.update(layer, k, v)
            mask = None
            if self.causal and t > 1:
                q_pos = torch.arange(offset, offset + t, device=x.device)
                k_pos = torch.arange(offset + t, device=x.device)
                mask = k_pos[None, :] <= q_pos[:, None]  # (T, offset+T), True = may attend
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.proj_drop(self.proj(out))
