"""The quantizer contract every codebook method implements.

A quantizer maps a channel-first latent ``z`` of shape ``(B, C, *grid)`` (any spatial rank:
1-D for audio/motion/actions, 2-D for images, 3-D for video) to a quantized latent of the same
shape, integer ``codes`` of shape ``(B, *grid)`` (or ``(B, *grid, depth)`` for residual
quantizers), a scalar training ``loss`` and per-batch ``stats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from metrics.codebook import histogram_stats


@dataclass
class QuantizerOutput:
    z_q: Tensor
    codes: Tensor
    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class Quantizer(nn.Module):
    """Base class: subclasses set ``dim``, ``codebook_size`` and ``depth`` and implement the three methods.

    ``depth`` is ``None`` for single-level quantizers (codes ``(B, *grid)``) and an int for
    residual quantizers (codes ``(B, *grid, depth)``).
    """

    dim: int
    codebook_size: int
    depth: int | None = None

    def forward(self, z: Tensor) -> QuantizerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def to_rows(z: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``(B, C, *grid) -> (B*prod(grid), C)``; returns the grid shape ``(B, *grid)`` to undo it."""
    if z.dim() < 3:
        raise ValueError(f"expected a channel-first latent (B, C, *grid) with at least one grid axis, "
                         f"got {tuple(z.shape)}")
    b, c, *grid = z.shape
    rows = z.movedim(1, -1).reshape(-1, c)
    return rows, (b, *grid)


def from_rows(rows: Tensor, grid: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`to_rows`: ``(N, C) -> (B, C, *grid)``."""
    return rows.reshape(*grid, rows.shape[-1]).movedim(-1, 1)


def usage_stats(codes: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """Per-batch usage fraction and perplexity of the code histogram (no N x K one-hot), computed by
    :func:`metrics.codebook.histogram_stats` like every other usage figure in the project."""
    stats = histogram_stats(torch.bincount(codes.reshape(-1).long(), minlength=codebook_size))
    return {"perplexity": stats["perplexity"], "usage": stats["usage"]}
