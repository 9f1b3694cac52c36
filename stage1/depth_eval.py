"""Per-depth evaluation of residual tokenizers (RQ-VAE): what each added level of codes buys.

A residual quantizer's codes ``(B, *grid, D)`` decode level by level: the first ``d`` levels give the
partial sum ``sum_{l<d} e(c_l)`` (the bitrate-``d`` reconstruction; with quantizer dropout the model
was trained to serve it). :class:`DepthReconstruction` accumulates, over a split, the MSE and PSNR of
decoding with the first ``d`` levels for every ``d = 1..D``; codebook usage and perplexity per level
and of the pooled (shared) codebook come from :class:`metrics.codebook.CodebookUsage`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor


@torch.no_grad()
def decode_first_levels(tokenizer: Any, codes: Tensor, levels: int) -> Tensor:
    """Decode residual codes ``(B, *grid, D)`` using only their first ``levels`` levels.

    Goes through the tokenizer's public ``decode``: the later levels are set to ``-1``, which the
    residual quantizer's ``decode`` skips, so the decoder sees the partial sum of the first levels.
    """
    depth = codes.shape[-1]
    if not 1 <= levels <= depth:
        raise ValueError(f"levels must lie in [1, {depth}], got {levels}")
    if levels == depth:
        return tokenizer.decode(codes)
    partial = codes.clone()
    partial[..., levels:] = -1
    return tokenizer.decode(partial)


class DepthReconstruction:
    """MSE and PSNR of the reconstruction from the first ``d`` levels, ``d = 1..depth``.

    Inputs and reconstructions are in ``[-1, 1]``; like :class:`metrics.reconstruction.ReconstructionMetrics`,
    MSE is on the ``[0, 1]`` scale and PSNR is per example on ``[0, 1]`` (peak 1), averaged over examples.
    """

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self.sq_err = torch.zeros(depth, dtype=torch.float64)
        self.psnr = torch.zeros(depth, dtype=torch.float64)
        self.examples = 0
        self.values = 0

    @torch.no_grad()
    def update(self, tokenizer: Any, x: Tensor, codes: Tensor) -> None:
        """Decode ``codes`` (the codes of ``x``) with 1..depth levels and accumulate the errors."""
        for d in range(1, self.depth + 1):
            xrec = decode_first_levels(tokenizer, codes, d).clamp(-1, 1).float()
            err = ((xrec - x.float()) / 2).pow(2).flatten(1).mean(1)  # per example, on the [0, 1] scale
            self.sq_err[d - 1] += float(err.sum()) * x[0].numel()
            self.psnr[d - 1] += float((-10 * torch.log10(err.clamp_min(1e-10))).sum())
        self.examples += x.shape[0]
        self.values += x.numel()

    def compute(self) -> dict[str, float]:
        """``mse_levels{d}`` (on the [0, 1] scale) and ``psnr_levels{d}`` (dB) for ``d = 1..depth``."""
        if self.examples == 0:
            return {}
        out: dict[str, float] = {}
        for d in range(1, self.depth + 1):
            out[f"mse_levels{d}"] = float(self.sq_err[d - 1]) / self.values
            out[f"psnr_levels{d}"] = float(self.psnr[d - 1]) / self.examples
        return out


def residual_depth(tokenizer: Any) -> int | None:
    """The depth ``D > 1`` of a tokenizer whose quantizer decodes prefixes of levels (residual), else ``None``.

    Grouped codes also carry a depth axis, but their groups are not a coarse-to-fine sum, so only a
    quantizer whose ``decode`` takes ``levels`` qualifies.
    """
    quantizer = getattr(tokenizer, "quantizer", None)
    depth = (getattr(tokenizer, "code_spec", None) or {}).get("depth")
    if quantizer is None or not depth or int(depth) < 2:
        return None
    return int(depth) if "levels" in inspect.signature(quantizer.decode).parameters else None
