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
from torch import Tensor, nn

from stage1.quantizers.base import Quantizer, QuantizerOutput, from_rows, to_rows, usage_stats


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

    # -- scalar maps ------------------------------------------------------------------------
    def bound(self, z: Tensor) -> Tensor:
        """Squash each channel so that rounding yields exactly ``levels[i]`` integer values."""
        return torch.tanh(z + self._shift) * self._half_l - self._offset

    def quantize(self, z: Tensor) -> Tensor:
        """Bound, round with a straight-through gradient, normalise to ``[-1, 1]`` (rows ``(N, d)``)."""
        bounded = self.bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        return rounded / self._half_width

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Normalised grid values ``(..., d)`` -> mixed-radix integers ``(...)``."""
        digits = torch.round(codes.float() * self._half_width + self._half_width).long()
        return (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Mixed-radix integers ``(...)`` -> normalised grid values ``(..., d)`` (float32)."""
        levels = torch.tensor(self.levels, device=indices.device)
        digits = (indices.long().unsqueeze(-1) // self._basis) % levels
        return (digits.float() - self._half_width) / self._half_width

    # -- contract -----------------------------------------------------------------------------
    def _rows_to_grid_codes(self, rows: Tensor) -> Tensor:
        # Quantize in float32: tanh/round in bf16 would merge neighbouring levels.
        with torch.autocast(device_type=rows.device.type, enabled=False):
            return self.quantize(self.project_in(rows.float()))

    def forward(self, z: Tensor) -> QuantizerOutput:
        rows, grid = to_rows(z)
        q = self._rows_to_grid_codes(rows)
        indices = self.codes_to_indices(q.detach())
        # Without a projection, hand back the input's dtype (e.g. bf16 under autocast).
        z_q = from_rows(self.project_out(q) if self._projects else q.to(rows.dtype), grid)
        codes = indices.reshape(grid)
        loss = torch.zeros((), device=z.device, dtype=torch.float32)
        return QuantizerOutput(z_q=z_q, codes=codes, loss=loss, stats=usage_stats(codes, self.codebook_size))

    def encode(self, z: Tensor) -> Tensor:
        rows, grid = to_rows(z)
        return self.codes_to_indices(self._rows_to_grid_codes(rows)).reshape(grid)

    def decode(self, codes: Tensor) -> Tensor:
        grid = tuple(codes.shape)
        q = self.indices_to_codes(codes.reshape(-1))
        return from_rows(self.project_out(q), grid)

    @property
    def _projects(self) -> bool:
        return self.dim != self.codebook_dim
