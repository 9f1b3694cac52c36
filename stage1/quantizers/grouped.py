"""Grouped (product) quantization: split the channels into groups, quantize each independently.

With ``groups`` groups of ``dim / groups`` channels and per-group codebooks of size ``K``, the
effective codebook is ``K**groups`` while each lookup only searches ``K`` codes (Jégou et al.
2011's product quantization; the "grouped" quantizers of wav2vec 2.0 and many audio codecs).

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

    def __init__(self, dim: int, groups: int, quantizer: Mapping[str, Any]) -> None:
        super().__init__()
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"dim={dim} must split into groups={groups} equal parts")
        self.dim = int(dim)
        self.groups = int(groups)
        self.depth = self.groups
        self.group_dim = self.dim // self.groups
        self.quantizers = nn.ModuleList(
            build_sub_quantizer(quantizer, self.group_dim, where=f"grouped.quantizer[{i}]") for i in range(self.groups)
        )
        self.codebook_size = int(self.quantizers[0].codebook_size)

    def forward(self, z: Tensor) -> QuantizerOutput:
        if z.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} channels, got {z.shape[1]}")
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
        chunks = z.split(self.group_dim, dim=1)
        return torch.stack([q.encode(c) for c, q in zip(chunks, self.quantizers)], dim=-1)

    def decode(self, codes: Tensor) -> Tensor:
        if codes.shape[-1] != self.groups:
            raise ValueError(f"expected codes (B, *grid, {self.groups}), got {tuple(codes.shape)}")
        parts = [q.decode(codes[..., i]) for i, q in enumerate(self.quantizers)]
        return torch.cat(parts, dim=1)  # cat promotes mixed dtypes (autocast)
