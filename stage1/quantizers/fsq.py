"""Finite Scalar Quantization (Mentzer et al. 2023, "FSQ: VQ-VAE Made Simple").

Each of ``d = len(levels)`` channels is bounded to a small interval and rounded to one of
``levels[i]`` integer values; the implicit codebook is the product grid of size
``prod(levels)``. There are no codebook parameters and no auxiliary loss: FSQ cannot collapse
by construction, which is why it is the reference point of the codebook-collapse benchmark.

Bounding follows the paper: ``bound(z) = tanh(z + shift) * half_l - offset`` with
``half_l = (L - 1)(1 + eps) / 2``. For odd ``L`` the rounded values are the ``L`` integers in
``[-(L-1)/2, (L-1)/2]``. For even ``L`` a symmetric interval would hold ``L + 1`` integers
near its ends, so the range is shifted by ``offset = 1/2`` (to ``[-L/2, L/2 - 1]``), and
``shift = atanh(offset / half_l)`` moves the input so that ``z = 0`` still maps to 0.
Rounded values are divided by ``L // 2`` so every channel lies in ``[-1, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage1.quantizers._fsq_ops import ProjectedFSQ, bound_and_round, ones_rows_to_wide, with_ones_column
from stage1.quantizers.base import Quantizer, QuantizerOutput, usage_stats


class FSQ(Quantizer):
    """Finite scalar quantizer over ``levels``; projects ``dim -> len(levels)`` (and back) when they differ.

    Codes are mixed-radix integers: ``index = sum_i digit_i * prod(levels[:i])`` with
    ``digit_i in [0, levels[i])``, so ``codebook_size == prod(levels)``.
    """

    def __init__(self, levels: Sequence[int], dim: int | None = None, eps: float = 1e-3) -> None:
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or any(level < 2 for level in levels):
            raise ValueError(f"FSQ levels must be a non-empty list of integers >= 2, got {levels}")
        self.levels = levels
        self.codebook_dim = len(levels)
        self.dim = int(dim) if dim is not None else self.codebook_dim
        self.codebook_size = math.prod(levels)
        self.eps = float(eps)

        lv = torch.tensor(levels, dtype=torch.float64)
        half_l = (lv - 1) * (1 + self.eps) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0).double()
        shift = torch.atanh(offset / half_l)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), dim=0)
        # Derived from ``levels``: rebuilt by the constructor, so they stay out of the state_dict.
        self.register_buffer("_half_l", half_l.float(), persistent=False)
        self.register_buffer("_offset", offset.float(), persistent=False)
        self.register_buffer("_shift", shift.float(), persistent=False)
        self.register_buffer("_half_width", (lv // 2).float(), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

        needs_proj = self.dim != self.codebook_dim
        self.project_in = nn.Linear(self.dim, self.codebook_dim) if needs_proj else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, self.dim) if needs_proj else nn.Identity()

    # -- scalar maps (``axis`` is the channel axis: -1 for rows, 1 for channel-first latents) ----
    def _per_channel(self, buf: Tensor, x: Tensor, axis: int) -> Tensor:
        shape = [1] * x.dim()
        shape[axis] = -1
        return buf.view(shape)

    def bound(self, z: Tensor, axis: int = -1) -> Tensor:
        """Squash each channel so that rounding yields exactly ``levels[i]`` integer values."""
        shift, half_l, offset = (self._per_channel(b, z, axis) for b in (self._shift, self._half_l, self._offset))
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: Tensor, axis: int = -1) -> Tensor:
        """Bound, round with a straight-through gradient, normalise to ``[-1, 1]``."""
        bounded = self.bound(z, axis)
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        return rounded / self._per_channel(self._half_width, z, axis)

    def codes_to_indices(self, codes: Tensor, axis: int = -1) -> Tensor:
        """Normalised grid values (``d`` channels on ``axis``) -> mixed-radix integers (``axis`` removed)."""
        half_width = self._per_channel(self._half_width, codes, axis)
        digits = torch.round(codes.float() * half_width + half_width).long()
        return (digits * self._per_channel(self._basis, codes, axis)).sum(dim=axis)

    def indices_to_codes(self, indices: Tensor, axis: int = -1) -> Tensor:
        """Mixed-radix integers -> normalised grid values (float32) with the ``d`` channels inserted at ``axis``."""
        idx = indices.long().unsqueeze(axis)
        levels = torch.tensor(self.levels, device=indices.device)
        digits = (idx // self._per_channel(self._basis, idx, axis)) % self._per_channel(levels, idx, axis)
        half_width = self._per_channel(self._half_width, idx, axis)
        return (digits.float() - half_width) / half_width

    # -- contract -----------------------------------------------------------------------------
    # Latents are flattened to (B, C, L) (a view); with projections, ``_fsq_ops`` reads them in whatever
    # memory layout they come and never makes a transposed copy (the copy cost more than the quantization).
    def _grid_values(self, z: Tensor) -> Tensor:
        # Quantize in float32: tanh/round in bf16 would merge neighbouring levels.
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.quantize(flat_channels(z).float(), axis=1)  # only without projections

    def forward(self, z: Tensor) -> QuantizerOutput:
        if self._projects:
            z_q, codes = self._projected_forward(z)
        else:
            q = self._grid_values(z)
            codes = self.codes_to_indices(q.detach(), axis=1)
            z_q = q.to(z.dtype)  # hand back the input's dtype (e.g. bf16 under autocast)
        codes = codes.reshape(z.shape[0], *z.shape[2:])
        loss = torch.zeros((), device=z.device, dtype=torch.float32)
        return QuantizerOutput(
            z_q=z_q.reshape(z.shape), codes=codes, loss=loss, stats=usage_stats(codes, self.codebook_size)
        )

    def _projected_forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Training path with projections: one fused autograd node (see ``_fsq_ops``), float32 inside."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = flat_channels(z).float()
            z_q, rounded = ProjectedFSQ.apply(
                flat,
                self.project_in.weight.float(),
                self.project_in.bias.float(),
                self.project_out.weight.float(),
                self.project_out.bias.float(),
                self._shift,
                self._half_l,
                self._offset,
                self._half_width,
            )
        return z_q.to(z.dtype), self._codes_from_rounded(rounded)

    def _codes_from_rounded(self, rounded: Tensor) -> Tensor:
        """``(N, d)`` rows of integer levels (from ``-half_width`` up) -> ``(N,)`` mixed-radix codes."""
        # One matrix-vector product (exact: float32 holds integers up to 2^24 > any practical codebook).
        return torch.mv(rounded + self._half_width, self._basis.to(rounded.dtype)).long()

    def encode(self, z: Tensor) -> Tensor:
        if not self._projects:
            return self.codes_to_indices(self._grid_values(z), axis=1).reshape(z.shape[0], *z.shape[2:])
        with torch.autocast(device_type=z.device.type, enabled=False):
            _, rounded = bound_and_round(
                flat_channels(z).detach().float(),
                self.project_in.weight.detach().float(),
                self.project_in.bias.detach().float(),
                self._shift,
                self._half_l,
                self._offset,
            )
        return self._codes_from_rounded(rounded).reshape(z.shape[0], *z.shape[2:])

    def decode(self, codes: Tensor) -> Tensor:
        batch = codes.shape[0]
        if not self._projects:
            q = self.indices_to_codes(codes.reshape(batch, -1), axis=1)
            return q.reshape(batch, q.shape[1], *codes.shape[1:])
        # Same row-wise product as the training path, so decode(encode(z)) matches its z_q.
        q_rows = self.indices_to_codes(codes.reshape(-1), axis=-1)
        z_q = ones_rows_to_wide(with_ones_column(q_rows), self.project_out.weight, self.project_out.bias, batch)
        return z_q.reshape(batch, z_q.shape[1], *codes.shape[1:])

    @property
    def _projects(self) -> bool:
        return self.dim != self.codebook_dim


def flat_channels(z: Tensor) -> Tensor:
    """``(B, C, *grid) -> (B, C, L)``, a view for contiguous input."""
    if z.dim() < 3:
        raise ValueError(
            f"expected a channel-first latent (B, C, *grid) with at least one grid axis, got {tuple(z.shape)}"
        )
    return z.flatten(2)


def pointwise(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a ``Linear`` (or ``Identity``) over the channel axis of ``(B, C, L)``: a 1x1 conv, no transpose."""
    if isinstance(layer, nn.Identity):
        return x
    return F.conv1d(x, layer.weight.unsqueeze(-1), layer.bias)
