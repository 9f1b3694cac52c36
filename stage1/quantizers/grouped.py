"""Grouped (product) quantization: split the channels into groups, quantize each independently.

With ``groups`` groups of ``dim / groups`` channels and per-group codebooks of size ``K``, the
effective codebook is ``K**groups`` while each lookup only searches ``K`` codes (Jégou et al.
2011's product quantization; the "grouped" quantizers of wav2vec 2.0 and many audio codecs).

With ``shared_codebook=True`` every group is looked up in ONE codebook: MoVQ's multichannel
quantization (Zheng et al. 2022). The group axis is then moved behind the grid and a single
quantizer sees it as one more spatial axis, so its statistics (EMA, k-means, restarts) pool all
groups in one update.

Codes are ``(B, *grid, groups)``. For the tokenizer's ``code_spec`` the ``groups`` axis plays the
role of ``depth`` (``self.depth = groups``): stage-2 priors that handle residual depth (for
example an RQ-Transformer's depth decoder) handle groups the same way, and ``decode`` takes the
codes of every group. Unlike residual levels, groups are unordered and all are required.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from stage1.quantizers.base import Quantizer, QuantizerOutput
from stage1.quantizers.residual import build_sub_quantizer, suffixed_stats


class GroupedQuantizer(Quantizer):
    """``groups`` independent quantizers over equal channel slices; codes ``(B, *grid, groups)``."""

    def __init__(self, dim: int, groups: int, quantizer: Mapping[str, Any], shared_codebook: bool = False) -> None:
        super().__init__()
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"dim={dim} must split into groups={groups} equal parts")
        self.dim = int(dim)
        self.groups = int(groups)
        self.depth = self.groups
        self.group_dim = self.dim // self.groups
        self.shared_codebook = bool(shared_codebook)
        count = 1 if self.shared_codebook else self.groups
        self.quantizers = nn.ModuleList(
            build_sub_quantizer(quantizer, self.group_dim, where=f"grouped.quantizer[{i}]") for i in range(count)
        )
        self.codebook_size = int(self.quantizers[0].codebook_size)

    def _groups_behind_grid(self, z: Tensor) -> Tensor:
        """``(B, groups * d, *grid) -> (B, d, *grid, groups)``: groups become one more grid axis."""
        b, _, *grid = z.shape
        return z.reshape(b, self.groups, self.group_dim, *grid).movedim(1, -1)

    def _groups_in_channels(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`_groups_behind_grid`."""
        b, d, *grid, g = z.shape
        return z.movedim(-1, 1).reshape(b, g * d, *grid)

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} channels, got {z.shape[1]}")
        if self.shared_codebook:
            out = self.quantizers[0](self._groups_behind_grid(z))
            return QuantizerOutput(z_q=self._groups_in_channels(out.z_q), codes=out.codes, loss=out.loss,
                                   stats=out.stats)
        parts, codes, stats = [], [], {}
        loss = z.new_zeros((), dtype=torch.float32)
        for i, (chunk, quantizer) in enumerate(zip(z.split(self.group_dim, dim=1), self.quantizers)):
            out = quantizer(chunk)
            parts.append(out.z_q)
            codes.append(out.codes)
            loss = loss + out.loss.float()
            stats.update(suffixed_stats(out.stats, out.codes, self.codebook_size, f"_group{i}"))
        stats["usage"] = torch.stack([stats[f"usage_group{i}"] for i in range(self.groups)]).mean()
        stats["perplexity"] = torch.stack([stats[f"perplexity_group{i}"] for i in range(self.groups)]).mean()
        z_q = torch.cat(parts, dim=1)  # cat promotes mixed dtypes (autocast)
        return QuantizerOutput(z_q=z_q, codes=torch.stack(codes, dim=-1), loss=loss, stats=stats)

    def encode(self, z: Tensor) -> Tensor:
        if self.shared_codebook:
            return self.quantizers[0].encode(self._groups_behind_grid(z))
        chunks = z.split(self.group_dim, dim=1)
        return torch.stack([q.encode(c) for c, q in zip(chunks, self.quantizers)], dim=-1)

    def decode(self, codes: Tensor) -> Tensor:
        if codes.shape[-1] != self.groups:
            raise ValueError(f"expected codes (B, *grid, {self.groups}), got {tuple(codes.shape)}")
        if self.shared_codebook:
            return self._groups_in_channels(self.quantizers[0].decode(codes))
        parts = [q.decode(codes[..., i]) for i, q in enumerate(self.quantizers)]
        return torch.cat(parts, dim=1)  # cat promotes mixed dtypes (autocast)
