"""A preallocated key/value cache for incremental (token-by-token) decoding.

Each layer owns two buffers ``(B, heads, max_len, head_dim)`` allocated once, so a decoding step
writes its new keys/values in place instead of concatenating (which would copy the whole history
every step). ``length`` is the number of positions already written: it is the position offset of
the next tokens, shared by all layers, and advances once per transformer forward.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k``/``v`` ``(B, heads, T, head_dim)`` at ``length``; return all keys/values so far.

        Does not advance ``length``: the transformer calls :meth:`advance` after its last layer.
        """
        t = k.shape[-2]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} + {t} tokens > max_len {self.max_len}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def reset(self) -> None:
        """Start a new sequence (buffers are reused; stale entries are never read past ``length``)."""
        self.length = 0
