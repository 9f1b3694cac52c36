"""Stacked expert FFNs and the grouped matmul that runs them on a sorted token buffer.

Experts store their weights stacked, ``w_in (E, D, H or 2H)`` and ``w_out (E, H, D)``, so that the
tokens of every expert, sorted into one contiguous buffer, are processed by one ``torch.mm`` per
expert on a slice of that buffer. Autograd through E slices would allocate a full-size zero
gradient per slice; the hand-written :class:`GroupedFFNFunction` instead writes every expert's
forward and backward products straight into preallocated buffers with ``torch.mm(..., out=...)``,
and applies the activation (and its derivative) once over the whole buffer.

``torch._grouped_mm`` exists in recent CPU builds, but on the 2-core CPU this was written on it was
not faster than the slice loop (see ``bench/moe.py``), so it is only used when asked for
(``grouped_mm=True``), and only where the build has it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("swiglu", "gelu")


def _act_forward(h: Tensor, act: str) -> Tensor:
    if act == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def _act_backward(grad_a: Tensor, h: Tensor, act: str) -> Tensor:
    """d(loss)/d(h) from d(loss)/d(act(h)), computed over the whole buffer at once."""
    if act == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        g_gate, g_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad_a, F.silu(gate), out=g_up)
        g_gate.copy_(torch.ops.aten.silu_backward(grad_a * up, gate))
        return grad_h
    return torch.ops.aten.gelu_backward(grad_a, h)


def _segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, start, end) for every non-empty expert slice of the sorted buffer."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


def _grouped_mm(x: Tensor, w: Tensor, segs: list[tuple[int, int, int]], out: Tensor) -> Tensor:
    for e, s, t in segs:
        torch.mm(x[s:t], w[e], out=out[s:t])
    return out


def _offsets(counts: list[int], device: torch.device) -> Tensor:
    return torch.tensor(counts, device=device, dtype=torch.int64).cumsum(0).to(torch.int32)


class GroupedFFNFunction(torch.autograd.Function):
    """y[s:t] = act(x[s:t] @ w_in[e]) @ w_out[e] for each expert's contiguous slice [s, t)."""

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, w_out: Tensor, counts: list[int], act: str, use_gmm: bool):
        segs = _segments(counts)
        a_rows = x.shape[0]
        if use_gmm:
            offs = _offsets(counts, x.device)
            h = torch._grouped_mm(x, w_in, offs=offs)
            a = _act_forward(h, act)
            y = torch._grouped_mm(a, w_out, offs=offs)
        else:
            h = _grouped_mm(x, w_in, segs, x.new_empty(a_rows, w_in.shape[-1]))
            a = _act_forward(h, act)
            y = _grouped_mm(a, w_out, segs, x.new_empty(a_rows, w_out.shape[-1]))
        ctx.save_for_backward(x, w_in, w_out, h)
        ctx.segs, ctx.act = segs, act
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, w_in, w_out, h = ctx.saved_tensors
        segs, act = ctx.segs, ctx.act
        grad_y = grad_y.contiguous()
        a = _act_forward(h, act)  # recomputed: cheaper than keeping a second (A, H) buffer alive
        grad_w_out = torch.zeros_like(w_out) if ctx.needs_input_grad[2] else None
        grad_w_in = torch.zeros_like(w_in) if ctx.needs_input_grad[1] else None
        grad_a = a  # reuse the buffer: a[s:t] is read for grad_w_out before grad_a[s:t] overwrites it
        for e, s, t in segs:
            if grad_w_out is not None:
                torch.mm(a[s:t].t(), grad_y[s:t], out=grad_w_out[e])
            torch.mm(grad_y[s:t], w_out[e].t(), out=grad_a[s:t])
        grad_h = _act_backward(grad_a, h, act)
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        for e, s, t in segs:
            if grad_w_in is not None:
                torch.mm(x[s:t].t(), grad_h[s:t], out=grad_w_in[e])
            if grad_x is not None:
                torch.mm(grad_h[s:t], w_in[e].t(), out=grad_x[s:t])
        return grad_x, grad_w_in, grad_w_out, None, None, None


class StackedExperts(nn.Module):
    """E independent FFN experts (SwiGLU or GELU, hidden ``hidden_dim``) with stacked weights."""

    def __init__(self, dim: int, num_experts: int, hidden_dim: int, activation: str = "swiglu",
                 grouped_mm: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"expert activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.dim, self.num_experts, self.hidden_dim = dim, num_experts, hidden_dim
        self.activation = activation
        self.use_grouped_mm = bool(grouped_mm) and hasattr(torch, "_grouped_mm")
        width = 2 * hidden_dim if activation == "swiglu" else hidden_dim
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, width))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default per expert (uniform in +-1/sqrt(fan_in)).
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden_dim), 1 / math.sqrt(self.hidden_dim))

    def forward(self, x_sorted: Tensor, counts: list[int]) -> Tensor:
        """Run expert e on rows ``[sum(counts[:e]), sum(counts[:e+1]))`` of ``x_sorted`` (A, D)."""
        if x_sorted.shape[0] == 0:
            return x_sorted.new_zeros(0, self.dim) + 0 * (self.w_in.sum() + self.w_out.sum())
        return GroupedFFNFunction.apply(x_sorted.contiguous(), self.w_in, self.w_out, counts,
                                        self.activation, self.use_grouped_mm)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` applied to rows of ``x`` with plain autograd ops (the reference path)."""
        return _act_forward(x @ self.w_in[e], self.activation) @ self.w_out[e]

    def batched(self, x: Tensor) -> Tensor:
        """All experts on equal-size groups: ``x`` (E, n, D) -> (E, n, D) with ``torch.bmm`` (Soft MoE)."""
        return torch.bmm(_act_forward(torch.bmm(x, self.w_in), self.activation), self.w_out)

    def extra_repr(self) -> str:
        return f"{self.num_experts} x ({self.dim} -> {self.hidden_dim} -> {self.dim}), {self.activation}"
