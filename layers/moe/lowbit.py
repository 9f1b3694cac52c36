"""Low-bit experts through the zoo's quantizers (the MoQE / QMoE point: expert weights tolerate
low precision well). Post-training, weight-only: routers, attention and everything else stay as they are.

A weight matrix is viewed as ``(..., out, in)`` (one row per output unit) and cut into groups of
``group`` consecutive input weights; every group becomes one code:

- ``"vq"``: a vector-quantization codebook of ``codebook_size`` entries of ``group`` values, shared
  by all experts of the tensor, fitted by the VQ zoo's Lloyd k-means
  (:func:`stage1.quantizers._vq_ops.kmeans`) and assigned with its nearest-code search. When the
  groups take at most ``codebook_size`` distinct values the codebook is exactly those values
  (k-means from random seeds could pick one value twice and lose another), so quantization is lossless.
- ``"fsq"``: the zoo's :class:`~stage1.quantizers.fsq.FSQ` grid with ``levels`` (odd) values per
  weight, on weights divided by a per-row absmax scale; a group of ``group`` weights is one
  mixed-radix FSQ index. Odd levels keep the grid symmetric and include zero.

Bits per weight count everything needed to rebuild the weights: ``ceil(log2 K)`` bits per code
(``K`` = codebook size, ``levels ** group`` for FSQ), plus the codebook (``K x group`` values) or the
per-row scales, at ``overhead_bits`` (16: fp16) each.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from stage1.quantizers._vq_ops import kmeans, nearest_code
from stage1.quantizers.fsq import FSQ

from .experts import StackedExperts


@dataclasses.dataclass(frozen=True)
class LowBitSpec:
    """How to quantize: ``kind`` "vq" (``codebook_size``) or "fsq" (``levels``), ``group`` weights per code."""

    kind: str = "vq"
    group: int = 4
    codebook_size: int = 256
    levels: int = 5
    kmeans_iters: int = 15
    overhead_bits: int = 16

    def __post_init__(self) -> None:
        if self.kind not in ("vq", "fsq"):
            raise ValueError(f"kind must be 'vq' or 'fsq', got {self.kind!r}")
        if self.group < 1:
            raise ValueError(f"group must be >= 1, got {self.group}")
        if self.kind == "fsq" and (self.levels < 3 or self.levels % 2 == 0):
            raise ValueError(f"FSQ levels must be odd and >= 3 (a symmetric grid with zero), got {self.levels}")


@dataclasses.dataclass
class QuantizedMatrix:
    """``values`` (the dequantized weights, the input's shape), ``codes`` (one per group),
    ``codebook`` (``(K, group)`` entries: the dequantized group of code ``c`` is ``codebook[c]``,
    times the row's ``scale`` for FSQ), ``scales`` (per row, FSQ only) and the bit count."""

    values: Tensor
    codes: Tensor
    codebook: Tensor
    scales: Tensor | None
    code_bits: int
    overhead_bits: int

    @property
    def num_weights(self) -> int:
        return self.values.numel()

    @property
    def bits_per_weight(self) -> float:
        return (self.code_bits + self.overhead_bits) / self.num_weights


def _index_bits(k: int) -> int:
    """Bits of a fixed-length index into ``k`` entries (at least 1)."""
    return max(1, math.ceil(math.log2(k)))


def _groups(w: Tensor, group: int) -> Tensor:
    if w.shape[-1] % group:
        raise ValueError(f"the input width {w.shape[-1]} is not a multiple of the group size {group}")
    return w.detach().float().reshape(-1, group)


def _vq_codebook(rows: Tensor, k: int, iters: int) -> Tensor:
    distinct = torch.unique(rows, dim=0)
    if len(distinct) <= k:
        return distinct  # lossless: every distinct group is an entry
    return kmeans(rows, k, iters)[0]


@torch.no_grad()
def quantize_matrix(w: Tensor, spec: LowBitSpec) -> QuantizedMatrix:
    """Quantize ``w (..., out, in)`` in groups of ``spec.group`` along ``in`` (see the module docstring)."""
    if spec.kind == "vq":
        rows = _groups(w, spec.group)
        codebook = _vq_codebook(rows, spec.codebook_size, spec.kmeans_iters)
        codes = nearest_code(rows, codebook.contiguous())
        values = codebook[codes].reshape(w.shape)
        k = len(codebook)  # codebook_size, or fewer when the groups have fewer distinct values
        return QuantizedMatrix(values.to(w.dtype), codes, codebook, None, codes.numel() * _index_bits(k),
                               k * spec.group * spec.overhead_bits)
    fsq = FSQ([spec.levels] * spec.group)
    scales = w.detach().float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)  # (..., out, 1)
    unit = _groups(w.detach().float() / scales, spec.group)  # in [-1, 1]: on FSQ's grid range
    codes = fsq.codes_to_indices(unit, axis=-1)  # rounds every weight to its nearest grid value
    codebook = fsq.indices_to_codes(torch.arange(fsq.codebook_size), axis=-1)  # (K, group)
    values = (codebook[codes].reshape(w.shape) * scales)
    return QuantizedMatrix(values.to(w.dtype), codes, codebook, scales,
                           codes.numel() * _index_bits(fsq.codebook_size),
                           scales.numel() * spec.overhead_bits)


@torch.no_grad()
def quantize_experts_(experts: StackedExperts, spec: LowBitSpec) -> list[QuantizedMatrix]:
    """Replace ``experts``' weights in place by their quantized values; one codebook per stacked
    tensor (``w_in``, ``w_out``), shared by its experts. Returns the two :class:`QuantizedMatrix`."""
    out = []
    for p in (experts.w_in, experts.w_out):  # stored (E, in, out): quantize the (E, out, in) view
        q = quantize_matrix(p.transpose(1, 2), spec)
        p.copy_(q.values.transpose(1, 2))
        out.append(q)
    return out


@torch.no_grad()
def quantize_linear_(linear: nn.Linear, spec: LowBitSpec) -> QuantizedMatrix:
    """Replace a bias-free ``nn.Linear``'s weight (out, in) in place by its quantized values."""
    q = quantize_matrix(linear.weight, spec)
    linear.weight.copy_(q.values)
    return q


def bits_per_weight(quantized: list[QuantizedMatrix]) -> float:
    """Total bits over total weights of several quantized matrices."""
    bits = sum(q.code_bits + q.overhead_bits for q in quantized)
    return bits / sum(q.num_weights for q in quantized)
