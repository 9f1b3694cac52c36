"""Input embeddings every prior shares: code tokens (with their depth level) and class labels.

:class:`CodeEmbedding` maps a flat token sequence to vectors: a table lookup for discrete codes (with
``extra_tokens`` rows after the codebook, e.g. MaskGIT's mask token) or a linear map for continuous
latents (GIVT), plus a learned embedding of each position's depth level for residual/grouped codes
(position ``i`` of the depth-minor flattening is level ``i % depth``).

:class:`ClassEmbedding` holds one row per class and a last "null" row: the label of an unconditional
prior, of a dropped label during training (label dropout) and of the unconditional branch of
classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stage2.code_layout import CodeLayout


class CodeEmbedding(nn.Module):
    """``(B, N)`` codes (or ``(B, N, C)`` latents) -> ``(B, N, dim)``, depth level added."""

    def __init__(self, layout: CodeLayout, dim: int, extra_tokens: int = 0) -> None:
        super().__init__()
        self.depth = layout.depth
        if layout.continuous:
            if extra_tokens:
                raise ValueError("continuous codes have no token table to add extra tokens to")
            self.tokens: nn.Module = nn.Linear(layout.continuous_dim, dim)
        else:
            self.tokens = nn.Embedding(layout.codebook_size + extra_tokens, dim)
        self.levels = nn.Embedding(layout.depth, dim) if layout.depth else None

    def add_levels(self, x: Tensor, offset: int = 0) -> Tensor:
        """Add the depth-level embedding of positions ``offset .. offset + x.shape[1]``."""
        if self.levels is None:
            return x
        levels = torch.arange(offset, offset + x.shape[1], device=x.device) % self.depth
        return x + self.levels(levels)

    def forward(self, tokens: Tensor, offset: int = 0) -> Tensor:
        return self.add_levels(self.tokens(tokens), offset)


class ClassEmbedding(nn.Module):
    """Class labels -> ``(B, dim)``; the last row is the null class (``num_classes``, or 0 when unconditional)."""

    def __init__(self, num_classes: int | None, dim: int) -> None:
        super().__init__()
        self.null_class = num_classes or 0
        self.table = nn.Embedding(self.null_class + 1, dim)

    def forward(self, labels: Tensor | None, batch: int | None = None) -> Tensor:
        """Embeddings ``(B, dim)``; ``labels=None`` means the null class for all ``batch`` rows."""
        if labels is None:
            labels = torch.full((batch,), self.null_class, dtype=torch.long, device=self.table.weight.device)
        return self.table(labels)
