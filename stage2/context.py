"""A conditioning code grid as an additive input of a prior (VQ-VAE-2's bottom prior, upsamplers).

The choice made here (issue 14): the context codes (e.g. VQ-VAE-2's top codes) are embedded with a
table of their own, resized to the modelled grid by nearest neighbour (every fine cell receives its
coarse parent's embedding: "the top code embeddings upsampled to the bottom grid"), mixed by one
3x3 convolution (so a cell also sees its parent's neighbours, which matter at the parents' borders)
and ADDED to the prior's input embedding of the same cell. Any prior whose input is one embedding
per code cell can use it (AR, MaskGIT); the whole context is known before sampling starts, so it is
no causal leak for an autoregressive prior. Residual context codes sum their depth levels'
embeddings; a residual modelled grid repeats the cell's context at each of its depth positions.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from layers.instantiate import ConfigError
from stage2.code_layout import CodeLayout


class ContextGrid(nn.Module):
    """Context codes ``(B, *context_grid[, depth])`` -> additive embeddings ``(B, seq_len, dim)`` in the
    modelled layout's token order (row-major over its grid, depth-minor)."""

    def __init__(self, context: CodeLayout, target: CodeLayout, dim: int) -> None:
        super().__init__()
        if context.continuous:
            raise ConfigError("a conditioning code grid must be discrete codes")
        if len(context.grid) != len(target.grid) or len(target.grid) not in (1, 2, 3):
            raise ConfigError(f"the conditioning grid {context.grid} and the modelled grid {target.grid} must have "
                              "the same number of axes (1, 2 or 3)")
        self.context, self.target = context, target
        self.tokens = nn.Embedding(context.codebook_size, dim)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(target.grid)]
        self.mix = conv(dim, dim, 3, padding=1)

    def forward(self, codes: Tensor) -> Tensor:
        if tuple(codes.shape[1:]) != self.context.shape:
            raise ValueError(f"context codes of shape {tuple(codes.shape)} do not match the conditioning "
                             f"level's code spec {(-1, *self.context.shape)}")
        emb = self.tokens(codes.long())  # (B, *grid[, depth], dim)
        if self.context.depth:
            emb = emb.sum(dim=-2)
        emb = emb.movedim(-1, 1)  # channel-first (B, dim, *grid)
        emb = F.interpolate(emb, size=self.target.grid, mode="nearest")
        emb = self.mix(emb).flatten(2).transpose(1, 2)  # (B, prod(grid), dim), row-major
        if self.target.depth:
            emb = emb.repeat_interleave(self.target.depth, dim=1)
        return emb


def context_inputs(grid: nn.Module | None, context: Tensor | None, rows: int) -> Tensor | None:
    """A prior's per-position context embeddings ``(rows, N, dim)``, or None for a prior without a
    conditioning grid. ``context`` holds one grid per sample; it is repeated when ``rows`` is a multiple
    (the unconditional branch of classifier-free guidance sees the same context)."""
    if grid is None:
        return None
    if context is None:
        raise ValueError("this prior is conditioned on another code grid (context_level): pass that level's "
                         "codes as context")
    emb = grid(context.to(next(grid.parameters()).device))  # any context module (code grid, observations)
    if rows % emb.shape[0]:
        raise ValueError(f"{emb.shape[0]} context grids for {rows} rows")
    return emb.repeat(rows // emb.shape[0], 1, 1)
