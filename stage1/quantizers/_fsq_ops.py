"""FSQ's training step as one autograd node: project in, bound, round (straight-through), project out.

Why a hand-written node: FSQ itself is a few elementwise ops on ``d = len(levels)`` channels;
its cost is the two projections over the wide ``dim`` channels and the number of passes over
them. Two things make those fast here:

* The narrow side is kept as rows ``(N, d)`` and every product that *writes* a wide tensor
  writes it channels-last, ``(N, d) @ (d, dim) -> (N, dim)``. A BLAS product with an inner
  size of 4 or 5 writing a channel-first ``(dim, L)`` block is several times slower than the
  same product writing rows. ``z_q`` and the input gradient are therefore returned as
  channels-last *views* of shape ``(B, dim, L)`` (a 2-D latent becomes
  ``torch.channels_last``), which convolutions consume directly.
* The backward reads the upstream gradient twice (for the input-side gradient, and once for
  ``project_out``'s weight *and* bias gradient, the bias folded in as a column of ones) and
  the input once; autograd on the composed ops makes several more passes.

The maths is the paper's straight-through estimator: the gradient of ``round`` is taken as the
identity, so ``d q / d h = half_l / half_width * (1 - tanh(h + shift)^2)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def rows_view(x: Tensor) -> Tensor | None:
    """``(B, C, L) -> (B*L, C)`` without a copy when ``x`` is channels-last in memory, else ``None``."""
    rows = x.transpose(1, 2)
    return rows.reshape(-1, x.shape[1]) if rows.is_contiguous() else None


def as_channel_first(rows: Tensor, batch: int) -> Tensor:
    """``(B*L, C) -> (B, C, L)`` as a channels-last view (no copy)."""
    return rows.view(batch, -1, rows.shape[1]).transpose(1, 2)


def project_to_rows(z: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``(B, dim, L) -> (B*L, d)`` rows of ``z @ weight.T + bias`` for a narrow output ``d``."""
    z_rows = rows_view(z)
    if z_rows is not None:
        return torch.addmm(bias, z_rows, weight.t())
    # Channel-first input: the narrow product is cheap this way; only the small result is transposed.
    narrow = torch.baddbmm(bias.view(1, -1, 1), weight.unsqueeze(0).expand(z.shape[0], -1, -1), z)
    return narrow.transpose(1, 2).reshape(-1, weight.shape[0])


def bound_and_round(
    z: Tensor, w_in: Tensor, b_in: Tensor, shift: Tensor, half_l: Tensor, offset: Tensor
) -> tuple[Tensor, Tensor]:
    """Project ``(B, dim, L)`` to ``(B*L, d)`` rows, bound them and round: ``(tanh, rounded integer levels)``.

    The one place FSQ's levels are computed with projections, for training and ``encode`` alike, so both
    give the same codes bit for bit."""
    tanh = torch.tanh(project_to_rows(z, w_in, b_in + shift))
    return tanh, torch.round(torch.addcmul(-offset, tanh, half_l))


def ones_rows_to_wide(q_ones: Tensor, weight: Tensor, bias: Tensor, batch: int) -> Tensor:
    """``(B*L, d + 1)`` rows whose last column is ones -> ``(B, dim, L)`` (channels-last view) of
    ``rows @ weight.T + bias``: one GEMM with the bias as an extra weight row, no broadcast copy of the
    bias into the wide output. Training and ``decode`` both use it, so they agree bit for bit."""
    return as_channel_first(q_ones @ torch.cat([weight.t(), bias.unsqueeze(0)]), batch)


def with_ones_column(rows: Tensor) -> Tensor:
    """``(N, d) -> (N, d + 1)`` with a trailing column of ones."""
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def per_batch_outer(a_rows: Tensor, b_rows: Tensor, batch: int) -> Tensor:
    """``a_rows.T @ b_rows`` for ``(N, p)`` and ``(N, r)`` rows, as ``batch`` products summed."""
    a = a_rows.view(batch, -1, a_rows.shape[1]).transpose(1, 2)
    return torch.bmm(a, b_rows.view(batch, -1, b_rows.shape[1])).sum(0)


class ProjectedFSQ(torch.autograd.Function):
    """``apply(z, W_in, b_in, W_out, b_out, shift, half_l, offset, half_width) -> (z_q, rounded)``.

    ``z`` is a float32 ``(B, dim, L)`` latent and the per-channel buffers are ``(d,)``. ``z_q`` comes
    back as ``(B, dim, L)``, channels-last in memory; ``rounded`` holds the ``(B*L, d)`` rows of integer
    levels and has no gradient.
    """

    @staticmethod
    def forward(
        ctx: Any,
        z: Tensor,
        w_in: Tensor,
        b_in: Tensor,
        w_out: Tensor,
        b_out: Tensor,
        shift: Tensor,
        half_l: Tensor,
        offset: Tensor,
        half_width: Tensor,
    ) -> tuple[Tensor, Tensor]:
        tanh, rounded = bound_and_round(z, w_in, b_in, shift, half_l, offset)
        # q with a trailing column of ones: one product computes project_out with its bias (no broadcast
        # copy of the bias into the wide output), and in the backward its weight and bias gradients.
        q_ones = torch.ones(rounded.shape[0], rounded.shape[1] + 1, dtype=z.dtype, device=z.device)
        torch.div(rounded, half_width, out=q_ones[:, :-1])
        z_q = ones_rows_to_wide(q_ones, w_out, b_out, z.shape[0])
        ctx.save_for_backward(z, w_in, w_out, tanh, q_ones, half_l / half_width)
        ctx.mark_non_differentiable(rounded)
        return z_q, rounded

    @staticmethod
    def backward(ctx: Any, grad_z_q: Tensor, _grad_rounded: Tensor | None) -> tuple[Tensor | None, ...]:
        z, w_in, w_out, tanh, q_ones, scale = ctx.saved_tensors
        batch = z.shape[0]
        g_rows = rows_view(grad_z_q)
        if g_rows is not None:
            # Operand layouts chosen by measurement: ``g @ w_out`` with a (dim, d)-contiguous right
            # operand is ~2.5x slower than the same product against a (d, dim)-contiguous one, and the
            # long reduction over N runs faster as B batched products than as one.
            grad_q = F.linear(g_rows, w_out.t().contiguous())  # (N, d)
            grad_out_params = per_batch_outer(q_ones, g_rows, batch)  # (d + 1, dim)
        else:
            g = grad_z_q.contiguous()
            grad_q = torch.bmm(w_out.t().unsqueeze(0).expand(batch, -1, -1), g)
            grad_q = grad_q.transpose(1, 2).reshape(-1, w_out.shape[1])
            grad_out_params = torch.bmm(g, q_ones.view(batch, -1, q_ones.shape[1])).sum(0).t()
        grad_h = grad_q.mul_(scale).mul_(1 - tanh.square())  # (N, d)
        # The input gradient takes the input's layout: a leaf input would otherwise pay a transposing copy.
        z_rows = rows_view(z)
        grad_z = None
        if z_rows is not None:
            if ctx.needs_input_grad[0]:
                grad_z = as_channel_first(grad_h @ w_in, batch)
            grad_w_in = per_batch_outer(grad_h, z_rows, batch)
        else:
            grad_h_cf = grad_h.view(batch, -1, grad_h.shape[1]).transpose(1, 2).contiguous()
            if ctx.needs_input_grad[0]:
                grad_z = torch.bmm(w_in.t().unsqueeze(0).expand(batch, -1, -1), grad_h_cf)
            grad_w_in = torch.bmm(grad_h_cf, z.transpose(1, 2)).sum(0)
        grad_b_in = grad_h.sum(0)
        grad_w_out, grad_b_out = grad_out_params[:-1].t(), grad_out_params[-1]
        return grad_z, grad_w_in, grad_b_in, grad_w_out, grad_b_out, *(None,) * 4
