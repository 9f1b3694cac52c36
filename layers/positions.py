"""Position information for transformers: learned absolute embeddings and rotary embeddings.

Rotary embeddings rotate pairs of query/key channels by an angle proportional to the position, so
attention scores depend on relative offsets. The 1-D variant uses the sequence index; the axis-wise
(2-D) variant splits the rotated pairs between grid axes: for an image grid ``[h, w]`` half of the
head dimension is rotated by the row index and half by the column index of each token (tokens are
laid out row-major). Tables are precomputed once for ``max_len`` positions and sliced with an
offset during cached decoding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _axis_angles(positions: Tensor, pairs: int, base: float) -> Tensor:
    """Angles ``(L, pairs)`` for integer ``positions`` ``(L,)`` with the usual geometric frequencies."""
    if pairs == 0:
        return positions.new_zeros((positions.numel(), 0), dtype=torch.float32)
    inv_freq = base ** (-torch.arange(pairs, dtype=torch.float64) / pairs)
    return (positions.to(torch.float64)[:, None] * inv_freq[None, :]).to(torch.float32)


class Rotary(nn.Module):
    """Rotary position embedding over a 1-D sequence (``grid=None``) or an N-D grid (axis-wise).

    Args:
        head_dim: channels per head (must be even; for a grid, ``head_dim/2`` pairs are split as evenly
            as possible between the axes, the first axis getting the remainder).
        max_len: number of positions for the 1-D table; for a grid it must equal
            ``num_prefix + prod(grid)`` (defaults to that).
        grid: grid shape (e.g. ``[h, w]``) for axis-wise rotary; ``None`` for 1-D.
        num_prefix: leading tokens that are not grid cells (e.g. a class token); they get no rotation
            under the grid variant. Ignored for 1-D.
        base: frequency base (10000 as in RoFormer).
    """

    def __init__(
        self,
        head_dim: int,
        max_len: int | None = None,
        grid: list[int] | tuple[int, ...] | None = None,
        num_prefix: int = 0,
        base: float = 10000.0,
    ):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        pairs = head_dim // 2
        if grid is None:
            if max_len is None:
                raise ValueError("1-D rotary embeddings need max_len")
            angles = _axis_angles(torch.arange(max_len), pairs, base)
        else:
            grid = [int(g) for g in grid]
            cells = math.prod(grid)
            n = num_prefix + cells
            if max_len is not None and max_len != n:
                raise ValueError(
                    f"rotary grid {grid} with {num_prefix} prefix token(s) has {n} positions, "
                    f"not max_len={max_len}"
                )
            if pairs < len(grid):
                raise ValueError(f"head_dim {head_dim} too small to rotate {len(grid)} grid axes")
            share = [pairs // len(grid)] * len(grid)
            share[0] += pairs - sum(share)
            # (cells, ndim) row-major coordinates of every grid cell
            coords = torch.stack(torch.unravel_index(torch.arange(cells), tuple(grid)), dim=-1)
            parts = [_axis_angles(coords[:, a], share[a], base) for a in range(len(grid))]
            angles = torch.cat([torch.zeros(num_prefix, pairs), torch.cat(parts, dim=-1)], dim=0)
            max_len = n
        self.max_len = int(max_len)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def rotate(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate ``x`` ``(..., T, head_dim)`` as positions ``offset .. offset+T-1``.

        Attention passes queries and keys stacked in one tensor, so a decoding step pays for one
        rotation instead of two.
        """
        t = x.shape[-2]
        if offset + t > self.max_len:
            raise ValueError(f"position {offset + t - 1} is beyond the rotary table (max_len={self.max_len})")
        return apply_rotary(x, self.cos[offset : offset + t].to(x.dtype), self.sin[offset : offset + t].to(x.dtype))

    def forward(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Rotate ``q`` and ``k`` ``(B, heads, T, head_dim)`` as positions ``offset .. offset+T-1``."""
        return self.rotate(q, offset), self.rotate(k, offset)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs ``(i, i + d/2)`` of ``x`` (..., T, d) by angles with ``cos``/``sin`` (T, d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LearnedPositions(nn.Module):
    """Absolute learned position embeddings added to the token embeddings (GPT-2 style)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.randn(max_len, dim) * 0.02)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        t = x.shape[1]
        if offset + t > self.max_len:
            raise ValueError(f"position {offset + t - 1} is beyond the learned table ({self.max_len})")
        return x + self.weight[offset : offset + t].to(x.dtype)
