"""Codebook usage over many batches, as a torchmetrics ``Metric``.

A quantizer's per-batch ``usage_stats`` only sees one batch; dead codes and codebook collapse
show up only in the histogram accumulated over an epoch (and over all ranks). The state is one
integer count tensor reduced with ``sum``, so DDP synchronisation adds the ranks' histograms.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


def histogram_stats(counts: Tensor, codebook_size: int | None = None) -> dict[str, Tensor]:
    """Usage, perplexity, dead codes and entropy (bits) of a code histogram: the one place these are computed.

    ``counts`` is the full histogram ``(K,)``, or only the non-zero counts of a codebook too large to
    histogram densely (then pass ``codebook_size``; unused codes add nothing to the entropy).
    """
    counts = counts.detach().to(torch.float64)
    size = counts.numel() if codebook_size is None else int(codebook_size)
    total = counts.sum()
    probs = counts / total.clamp_min(1.0)
    # 0 * log 0 is taken as 0: unused codes contribute nothing to the entropy.
    entropy_nats = (-(probs * torch.log(probs.clamp_min(1e-300))).sum()).clamp_min(0.0)
    used = (counts > 0).sum()
    return {
        "usage": used.float() / size,
        "perplexity": entropy_nats.exp().float(),
        "dead_codes": (size - used).long(),
        "entropy_bits": (entropy_nats / math.log(2.0)).float(),
    }


class CodebookUsage(Metric):
    """Histogram of code indices accumulated across ``update`` calls (and DDP ranks).

    Args:
        codebook_size: number of entries ``K`` in the (each) codebook.
        depth: ``None`` for single-level codes ``(B, *grid)``; an int for residual codes
            ``(B, *grid, depth)``, counted per level.
        validate: check that codes lie in ``[0, K)`` (one min/max per update; turn off in
            hot loops once the quantizer is trusted).

    ``compute()`` returns ``usage`` (fraction of entries used at least once), ``perplexity``
    (exp of the histogram entropy; K for perfectly uniform use, 1 for collapse),
    ``dead_codes`` (entries never used) and ``entropy_bits``. For ``depth > 1`` these overall
    values pool all levels into one histogram (the shared-codebook view of RQ-VAE), and
    ``usage_level{i}``, ``perplexity_level{i}``, ``dead_codes_level{i}`` and
    ``entropy_bits_level{i}`` give each level alone (the view to watch when every level has
    its own codebook).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    counts_state: Tensor

    def __init__(self, codebook_size: int, depth: int | None = None, validate: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if depth is not None and depth < 1:
            raise ValueError(f"depth must be None or >= 1, got {depth}")
        self.codebook_size = int(codebook_size)
        self.depth = depth
        self.validate = validate
        levels = 1 if depth is None else depth
        self.add_state(
            "counts_state",
            default=torch.zeros(levels, self.codebook_size, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, codes: Tensor) -> None:
        """Add a batch of integer codes: ``(B, *grid)`` or, with ``depth``, ``(B, *grid, depth)``."""
        if codes.is_floating_point() or codes.is_complex():
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        codes = codes.long()
        if self.depth is None:
            flat = codes.reshape(-1)
            levels = 1
        else:
            if codes.dim() < 1 or codes.shape[-1] != self.depth:
                raise ValueError(
                    f"residual codes must end in a depth axis of size {self.depth}, "
                    f"got shape {tuple(codes.shape)}"
                )
            levels = self.depth
            # Offset each level into its own block of K bins, so one bincount counts all levels.
            offsets = torch.arange(levels, device=codes.device) * self.codebook_size
            flat = (codes.reshape(-1, levels) + offsets).reshape(-1)
        if flat.numel() == 0:
            return
        if self.validate:
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"codes must lie in [0, {self.codebook_size}), got range [{lo}, {hi}]")
        hist = torch.bincount(flat, minlength=levels * self.codebook_size)
        self.counts_state += hist.view(levels, self.codebook_size).to(self.counts_state.device)

    def compute(self) -> dict[str, Tensor]:
        counts = self.counts_state
        out = histogram_stats(counts.sum(0))
        if self.depth is not None and self.depth > 1:
            for i in range(self.depth):
                for key, value in histogram_stats(counts[i]).items():
                    out[f"{key}_level{i}"] = value
        return out

    def counts(self) -> Tensor:
        """Aggregated (synchronised across ranks) counts: ``(K,)``, or ``(depth, K)`` with ``depth``."""
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            counts = self.counts_state.clone()
        return counts[0] if self.depth is None else counts
