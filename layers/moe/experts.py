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


def _act_saving(h: Tensor, act: str) -> tuple[Tensor | None, Tensor]:
    """(silu(gate) or None, act(h)): what the backward needs, as autograd would keep it."""
    if act == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        s = F.silu(gate)
        return s, s * up
    return None, F.gelu(h)


def _act_grad(grad_a: Tensor, h: Tensor, s: Tensor | None, act: str) -> Tensor:
    """d loss / d h, written straight into one buffer (no ``cat`` of the two SwiGLU halves)."""
    if act != "swiglu":
        return torch.ops.aten.gelu_backward(grad_a, h)
    gate, up = h.chunk(2, dim=-1)
    grad_h = torch.empty_like(h)
    g_gate, g_up = grad_h.chunk(2, dim=-1)
    torch.ops.aten.silu_backward.grad_input(grad_a * up, gate, grad_input=g_gate)
    torch.mul(grad_a, s, out=g_up)
    return grad_h


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
        rows = x.shape[0]
        offs = _offsets(counts, x.device) if use_gmm else None
        h = torch._grouped_mm(x, w_in, offs=offs) if use_gmm else _grouped_mm(
            x, w_in, segs, x.new_empty(rows, w_in.shape[-1]))
        s, a = _act_saving(h, act)
        y = torch._grouped_mm(a, w_out, offs=offs) if use_gmm else _grouped_mm(
            a, w_out, segs, x.new_empty(rows, w_out.shape[-1]))
        # Saved like autograd would for the dense FFN (h, silu(gate), a): no recomputation later.
        ctx.save_for_backward(x, w_in, w_out, h, s, a)
        ctx.segs, ctx.act, ctx.counts = segs, act, counts
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, w_in, w_out, h, s, a = ctx.saved_tensors
        segs, act = ctx.segs, ctx.act
        grad_y = grad_y.contiguous()
        grad_w_out = _empty_grad(w_out, ctx.counts) if ctx.needs_input_grad[2] else None
        grad_w_in = _empty_grad(w_in, ctx.counts) if ctx.needs_input_grad[1] else None
        grad_a = torch.empty_like(a)
        for e, lo, hi in segs:
            if grad_w_out is not None:
                torch.mm(a[lo:hi].t(), grad_y[lo:hi], out=grad_w_out[e])
            torch.mm(grad_y[lo:hi], w_out[e].t(), out=grad_a[lo:hi])
        grad_h = _act_grad(grad_a, h, s, act)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        for e, lo, hi in segs:
            if grad_w_in is not None:
                torch.mm(x[lo:hi].t(), grad_h[lo:hi], out=grad_w_in[e])
            if grad_x is not None:
                torch.mm(grad_h[lo:hi], w_in[e].t(), out=grad_x[lo:hi])
        return grad_x, grad_w_in, grad_w_out, None, None, None


class BatchedFFNFunction(torch.autograd.Function):
    """y[e] = act(x[e] @ w_in[e]) @ w_out[e] for equal-size groups ``x`` (E, C, D), by ``bmm``.

    One batched matmul lets MKL run whole per-expert GEMMs on separate threads, which on a small
    (and shared) CPU is as efficient as one dense GEMM, unlike E separately parallelised calls.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_in: Tensor, w_out: Tensor, act: str):
        h = torch.bmm(x, w_in)
        s, a = _act_saving(h, act)
        ctx.save_for_backward(x, w_in, w_out, h, s, a)
        ctx.act = act
        return torch.bmm(a, w_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, w_in, w_out, h, s, a = ctx.saved_tensors
        grad_w_out = torch.bmm(a.transpose(1, 2), grad_y) if ctx.needs_input_grad[2] else None
        grad_h = _act_grad(torch.bmm(grad_y, w_out.transpose(1, 2)), h, s, ctx.act)
        grad_w_in = torch.bmm(x.transpose(1, 2), grad_h) if ctx.needs_input_grad[1] else None
        grad_x = torch.bmm(grad_h, w_in.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        return grad_x, grad_w_in, grad_w_out, None


def _empty_grad(w: Tensor, counts: list[int]) -> Tensor:
    """Gradient buffer for stacked weights: every used expert's slot is overwritten by an mm."""
    g = torch.empty_like(w)
    for e, n in enumerate(counts):
        if n == 0:
            g[e].zero_()
    return g


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
        x, w_in, w_out, dev = self._operands(x_sorted)
        with torch.autocast(dev, enabled=False):
            return GroupedFFNFunction.apply(x, w_in, w_out, counts, self.activation, self.use_grouped_mm)

    def _operands(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, str]:
        """Inputs and weights in one dtype: autocast's when it is on (the hand-written functions
        run with autocast off, so their ``out=`` buffers match), else the weights' dtype."""
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.w_in.dtype
        return x.to(dt).contiguous(), self.w_in.to(dt), self.w_out.to(dt), dev

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` applied to rows of ``x`` with plain autograd ops (the reference path)."""
        return _act_forward(x @ self.w_in[e], self.activation) @ self.w_out[e]

    def batched(self, x: Tensor) -> Tensor:
        """All experts on equal-size groups: ``x`` (E, n, D) -> (E, n, D) with ``torch.bmm``."""
        x, w_in, w_out, dev = self._operands(x)
        with torch.autocast(dev, enabled=False):
            return BatchedFFNFunction.apply(x, w_in, w_out, self.activation)

    def extra_repr(self) -> str:
        return f"{self.num_experts} x ({self.dim} -> {self.hidden_dim} -> {self.dim}), {self.activation}"
