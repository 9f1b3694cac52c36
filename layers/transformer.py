"""A pre-norm transformer backbone shared by the stage-two priors (AR, MaskGIT, ...).

The input is a sequence of embeddings ``(B, T, D)`` (the prior owns token/class embeddings and the
output head); this module owns positions, blocks and the final norm. The feed-forward of a block
is the "FFN slot": the default :class:`layers.mlp.MLP`, or any component spec ``{target, params}``
(e.g. a mixture of experts) built through :func:`layers.instantiate.instantiate` with ``dim``.
The self-attention is the "attention slot": the default :class:`layers.attention.Attention`, or a
component spec built with ``dim``, ``causal`` and ``head_dim`` (e.g. mixture of attention heads)
whose forward takes ``(x, rotary, cache, layer)``.
Either may return ``(y, aux)``; ``aux["loss"]`` is an already-weighted auxiliary loss and other keys
are statistics; :meth:`Transformer.forward` sums the losses into ``aux_loss`` and reports the
statistics as ``layer{i}/{key}`` (``layer{i}/attn/{key}`` for the attention slot's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from layers.attention import Attention
from layers.instantiate import instantiate
from layers.kv_cache import KVCache
from layers.mlp import MLP
from layers.norms import AdaptiveNorm, make_norm
from layers.positions import LearnedPositions, Rotary

POSITIONS = ("learned", "rope1d", "rope2d", "none")


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``x + ffn(norm(x))``; with ``cond_dim`` both norms are AdaLN."""

    def __init__(
        self, dim: int, heads: int, causal: bool, norm: str, ffn: nn.Module, dropout: float,
        cond_dim: int | None = None, attn: nn.Module | None = None,
    ):
        super().__init__()
        self.adaptive = cond_dim is not None
        self.norm1 = AdaptiveNorm(norm, dim, cond_dim) if self.adaptive else make_norm(norm, dim)
        self.attn = attn if attn is not None else Attention(dim, heads, causal, dropout)
        self.norm2 = AdaptiveNorm(norm, dim, cond_dim) if self.adaptive else make_norm(norm, dim)
        self.ffn = ffn

    def _norm(self, norm: nn.Module, x: Tensor, cond: Tensor | None) -> Tensor:
        if not self.adaptive:
            return norm(x)
        if cond is None:
            raise ValueError("this transformer has AdaLN blocks (cond_dim set): forward needs cond")
        return norm(x, cond)

    def forward(
        self, x: Tensor, rotary: Rotary | None, cache: KVCache | None, layer: int, cond: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        attended = self.attn(self._norm(self.norm1, x, cond), rotary, cache, layer)
        aux = None
        if isinstance(attended, tuple):  # an attention-slot module with its own aux (MoA)
            attended, attn_aux = attended
            aux = {"loss": attn_aux["loss"]} | {f"attn/{k}": v for k, v in attn_aux.items() if k != "loss"}
        x = x + attended
        out = self.ffn(self._norm(self.norm2, x, cond))
        if isinstance(out, tuple):
            out, ffn_aux = out
            if aux is None:
                aux = ffn_aux
            else:
                aux |= {k: v for k, v in ffn_aux.items() if k != "loss"}
                aux["loss"] = aux["loss"] + ffn_aux["loss"]
        return x + out, aux


class Transformer(nn.Module):
    """Pre-norm transformer.

    Args:
        dim, depth, heads: width, number of blocks, attention heads.
        causal: causal self-attention (AR priors) or bidirectional (MaskGIT).
        mlp_ratio, norm, mlp: default FFN width ratio, ``"rmsnorm"|"layernorm"``, ``"swiglu"|"gelu"``.
        positions: ``"learned"`` (absolute, added to the input), ``"rope1d"``, ``"rope2d"`` (axis-wise
            rotary over ``grid``; a grid of rank > 2 splits the head dim over all its axes) or ``"none"``.
        max_len: longest sequence (the KV cache and position tables are sized by it). For rope2d it
            defaults to ``num_prefix + prod(grid)``.
        grid: grid shape for rope2d, tokens laid out row-major after ``num_prefix`` prefix tokens.
        num_prefix: leading non-grid tokens (e.g. a class token) that rope2d leaves unrotated.
        dropout: attention, residual and embedding dropout.
        ffn: optional component spec replacing the MLP of every ``ffn_every``-th block (blocks
            ``ffn_every-1, 2*ffn_every-1, ...``; all blocks when 1).
        attention, attention_every: likewise for the self-attention of every ``attention_every``-th
            block; the spec is built with ``dim``, ``causal`` and ``head_dim = dim // heads``.
        cond_dim: when set, every block's norms are AdaLN (:class:`layers.norms.AdaptiveNorm`)
            modulated by a per-sample vector ``cond`` ``(B, cond_dim)`` given to :meth:`forward`
            (e.g. a diffusion timestep plus class embedding).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        causal: bool,
        mlp_ratio: float = 4.0,
        norm: str = "rmsnorm",
        mlp: str = "swiglu",
        positions: str = "rope1d",
        max_len: int | None = None,
        grid: list[int] | None = None,
        num_prefix: int = 0,
        dropout: float = 0.0,
        ffn: Mapping[str, Any] | None = None,
        ffn_every: int = 1,
        cond_dim: int | None = None,
        attention: Mapping[str, Any] | None = None,
        attention_every: int = 1,
    ):
        super().__init__()
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; choose one of {', '.join(POSITIONS)}")
        if ffn_every < 1 or attention_every < 1:
            raise ValueError(f"ffn_every and attention_every must be >= 1, got {ffn_every}, {attention_every}")
        self.dim, self.depth, self.heads, self.causal = dim, depth, heads, causal
        self.head_dim = dim // heads
        self.positions = positions
        self.rotary: Rotary | None = None
        self.pos_emb: LearnedPositions | None = None
        if positions == "rope2d":
            if grid is None:
                raise ValueError("positions='rope2d' needs grid=[h, w]")
            self.rotary = Rotary(self.head_dim, max_len, grid=grid, num_prefix=num_prefix)
            max_len = self.rotary.max_len
        elif max_len is None:
            raise ValueError(f"positions={positions!r} needs max_len")
        elif positions == "rope1d":
            self.rotary = Rotary(self.head_dim, max_len)
        elif positions == "learned":
            self.pos_emb = LearnedPositions(dim, max_len)
        self.max_len = int(max_len)
        self.drop = nn.Dropout(dropout)

        blocks = []
        for i in range(depth):
            if ffn is not None and (i + 1) % ffn_every == 0:
                ffn_mod = instantiate(ffn, dim=dim, where=f"transformer ffn (block {i})")
                if causal and getattr(ffn_mod, "causal_safe", True) is False:
                    router = getattr(ffn_mod, "router", None)
                    router_name = type(router).__name__ if router is not None else ffn.get("target")
                    raise ValueError(
                        f"block {i}: FFN {type(ffn_mod).__name__} with router {router_name} is not "
                        "causal-safe "
                        "(it mixes tokens of the sequence, which leaks the future); it cannot be used in a "
                        "causal transformer. Use a token-choice router (e.g. top-k) for AR priors."
                    )
            else:
                ffn_mod = MLP(dim, mlp_ratio, mlp, dropout)
            attn_mod = None
            if attention is not None and (i + 1) % attention_every == 0:
                attn_mod = instantiate(attention, dim=dim, causal=causal, head_dim=self.head_dim,
                                       where=f"transformer attention (block {i})")
            blocks.append(Block(dim, heads, causal, norm, ffn_mod, dropout, cond_dim, attn_mod))
        self.blocks = nn.ModuleList(blocks)
        self.norm = make_norm(norm, dim)

    def new_cache(
        self, batch: int, max_len: int | None = None, device: Any = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty KV cache sized for this transformer (``max_len`` defaults to the model's)."""
        p = next(self.parameters())
        return KVCache(
            self.depth,
            batch,
            self.heads,
            max_len or self.max_len,
            self.head_dim,
            dtype=dtype or p.dtype,
            device=device or p.device,
        )

    def forward(
        self, x: Tensor, cache: KVCache | None = None, cond: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Hidden states ``(B, T, D)`` after the final norm, and the aux dict.

        ``cond`` ``(B, cond_dim)`` modulates the AdaLN norms of a transformer built with ``cond_dim``.

        With ``cache``, ``x`` holds the next ``T`` tokens at positions ``cache.length ..``; the cache
        is advanced by ``T`` on return.
        """
        offset = cache.length if cache is not None else 0
        if offset + x.shape[1] > self.max_len:
            raise ValueError(f"sequence of {offset + x.shape[1]} positions exceeds max_len {self.max_len}")
        if self.pos_emb is not None:
            x = self.pos_emb(x, offset)
        x = self.drop(x)
        aux: dict[str, Tensor] = {}
        aux_loss = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            x, layer_aux = block(x, self.rotary, cache, i, cond)
            if layer_aux:
                for key, value in layer_aux.items():
                    if key == "loss":
                        aux_loss = aux_loss + value
                    else:
                        aux[f"layer{i}/{key}"] = value
        if cache is not None:
            cache.advance(x.shape[1])
        aux["aux_loss"] = aux_loss
        return self.norm(x), aux
