"""The MoE layer (a drop-in FFN) and its conv-feature-map wrapper.

Dispatch: the router's flat (token, expert, gate) assignments are sorted by expert (stable
``argsort``, so within an expert tokens stay in position order), the tokens gathered into one
contiguous buffer, every expert run on its slice (:mod:`layers.moe.experts`), and the gate-weighted
results scattered back with ``index_add``. Nothing of size tokens x experts x capacity is built.

Dropless by default. With ``capacity_factor`` each expert keeps at most
``ceil(k * capacity_factor * N / E)`` assignments, N = all tokens of the batch and k the router's
assignments per token (A/N); overflow is dropped, lowest priority first: ``drop_policy="position"``
drops the latest tokens of the batch (GShard/Switch), ``"gate"`` the smallest gates (BPR-like).
A dropped assignment contributes nothing (the block's residual carries the token). The fraction of
assignments dropped is reported.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.instantiate import ConfigError, check_params, resolve_target

from .contract import Routing
from .experts import StackedExperts
from .routers import Router

DEFAULT_ROUTER = {"target": "layers.moe.TopKRouter", "params": {}}


class _GatherRepeated(torch.autograd.Function):
    """``x[src]`` where every token appears exactly k times in ``src`` (= order // k).

    The backward un-permutes with a gather (``inv``) and sums the k copies, instead of the
    scatter-add that ``index_select``'s autograd would use (markedly slower on CPU).
    """

    @staticmethod
    def forward(ctx, x: Tensor, src: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, src)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (inv,) = ctx.saved_tensors
        g = grad.index_select(0, inv)
        return g.view(-1, ctx.k, g.shape[-1]).sum(1), None, None, None


class _PaddedGather(torch.autograd.Function):
    """``ext(x)[idx]`` with ``ext`` appending a zero row (index ``len(x)`` = padding); backward is
    the gather ``ext(grad)[bwd_idx]`` summed over groups of ``k`` rows. Both directions are gathers
    because the caller knows both index maps of the (padded) permutation."""

    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor, bwd_idx: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(bwd_idx)
        ctx.k = k
        return torch.cat([x, x.new_zeros(1, x.shape[-1])]).index_select(0, idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (bwd_idx,) = ctx.saved_tensors
        g = torch.cat([grad, grad.new_zeros(1, grad.shape[-1])]).index_select(0, bwd_idx)
        if ctx.k > 1:
            g = g.view(-1, ctx.k, g.shape[-1]).sum(1)
        return g, None, None, None


class _Permute(torch.autograd.Function):
    """Row permutation ``x[perm]`` whose backward is the gather ``grad[inv]`` (no scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


def build_router(spec: Mapping[str, Any] | None, dim: int, num_experts: int, top_k: int,
                 where: str = "moe.router") -> Router:
    """Instantiate a router spec, filling ``dim``/``num_experts``/``top_k`` where it takes them."""
    spec = dict(spec or DEFAULT_ROUTER)
    unknown = set(spec) - {"target", "params"}
    if unknown or "target" not in spec:
        raise ConfigError(f"{where}: a router spec is {{target, params}}, got keys {sorted(spec)}")
    cls = resolve_target(spec["target"], base=Router, where=where)  # checked before its constructor runs
    params = dict(spec.get("params") or {})
    accepted = inspect.signature(cls).parameters
    for key, value in (("dim", dim), ("num_experts", num_experts), ("top_k", top_k)):
        if key in accepted and key not in params:
            params[key] = value
    check_params(cls, params, where)
    router = cls(**params)
    if not isinstance(router, Router):
        raise ConfigError(f"{where}: {spec['target']} is not a layers.moe router")
    return router


class SharedExperts(nn.Module):
    """``num_shared`` always-active experts (DeepSeekMoE). n experts of hidden h summed equal one
    FFN of hidden n*h, so they run as a single dense FFN."""

    def __init__(self, dim: int, hidden_dim: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(dim, hidden_dim * (2 if activation == "swiglu" else 1), bias=False)
        self.w_out = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.w_in(x)
        if self.activation == "swiglu":
            g, u = h.chunk(2, dim=-1)
            return self.w_out(F.silu(g) * u)
        return self.w_out(F.gelu(h))


class MoE(nn.Module):
    """Mixture-of-Experts FFN: ``forward(x (B, T, D)) -> (y (B, T, D), aux)``.

    ``aux``: ``loss`` (the router's weighted auxiliary loss, add it to the training loss), ``load``
    (fraction of assignments per choice, before capacity drops), ``router_entropy``,
    ``dropped_fraction`` and the router's own statistics. ``num_shared`` adds always-active shared
    experts of hidden ``shared_hidden_dim or hidden_dim`` each (DeepSeekMoE).
    """

    def __init__(self, dim: int, num_experts: int = 8, top_k: int = 2, hidden_dim: int | None = None,
                 router: Mapping[str, Any] | None = None, activation: str = "swiglu",
                 capacity_factor: float | None = None, drop_policy: str = "position", num_shared: int = 0,
                 shared_hidden_dim: int | None = None, grouped_mm: bool = False,
                 max_padding: float | None = 0.15) -> None:
        super().__init__()
        if drop_policy not in ("position", "gate"):
            raise ValueError(f"drop_policy must be 'position' or 'gate', got {drop_policy!r}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None (dropless), got {capacity_factor}")
        hidden_dim = hidden_dim or 4 * dim
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.max_padding = max_padding
        self.router = build_router(router, dim, num_experts, top_k)
        self.experts = StackedExperts(dim, num_experts, hidden_dim, activation, grouped_mm)
        self.shared = (SharedExperts(dim, num_shared * (shared_hidden_dim or hidden_dim), activation)
                       if num_shared > 0 else None)
        # Router choice -> physical expert; set by layers.moe.merge after merging experts (None: identity).
        self.register_buffer("expert_map", None)

    @property
    def causal_safe(self) -> bool:
        """False when the router looks at other tokens of the sequence (expert-choice, Soft MoE)."""
        return bool(getattr(self.router, "causal_safe", True))

    @property
    def router_name(self) -> str:
        return type(self.router).__name__

    def route(self, x: Tensor) -> Routing:
        if getattr(self.router, "soft", False):
            return self.router.mix(x, self.experts)
        return self.router(x)

    def _plan(self, r: Routing, n: int) -> tuple[Tensor, list[int], Tensor]:
        """Order of assignments sorted by expert, per-expert counts, dropped fraction."""
        a = r.expert_idx.numel()
        if self.capacity_factor is not None and self.drop_policy == "gate":
            pre = torch.argsort(r.gate.detach(), descending=True, stable=True)
            order = pre[torch.argsort(r.expert_idx[pre], stable=True)]
        else:
            order = torch.argsort(r.expert_idx, stable=True)
        e = self.experts.num_experts  # physical experts (fewer than the router's choices after merging)
        counts = torch.bincount(r.expert_idx, minlength=e)
        dropped = torch.zeros((), device=r.gate.device)
        if self.capacity_factor is not None and a > 0:
            capacity = math.ceil(a / n * self.capacity_factor * n / e)
            starts = counts.cumsum(0) - counts
            expert_sorted = r.expert_idx[order]
            rank = torch.arange(a, device=order.device) - starts[expert_sorted]
            keep = rank < capacity
            dropped = 1.0 - keep.float().mean()
            order, counts = order[keep], counts.clamp(max=capacity)
        return order, counts.tolist(), dropped

    def _dispatch_fixed_k(self, xf: Tensor, r: Routing, k: int) -> Tensor:
        """Dropless top-k: sort, gather, run experts, un-permute and mix the k outputs per token."""
        n, d = xf.shape
        a, e = r.expert_idx.numel(), self.experts.num_experts
        order = torch.argsort(r.expert_idx, stable=True)
        counts_t = torch.bincount(r.expert_idx, minlength=e)
        counts = counts_t.tolist()
        cap = max(counts)
        if self.max_padding is not None and e * cap <= (1.0 + self.max_padding) * a:
            # Equal-size groups: pad every expert to the largest count and run one batched matmul.
            arange = torch.arange(a, device=order.device)
            e_sorted = r.expert_idx[order]
            slot_sorted = e_sorted * cap + arange - (counts_t.cumsum(0) - counts_t)[e_sorted]
            pos = torch.empty_like(order)
            pos[order] = slot_sorted  # padded slot of each assignment (token-major order)
            slot_assign = torch.full((e * cap,), a, dtype=order.dtype, device=order.device)
            slot_assign[slot_sorted] = order  # assignment held by each slot; a = padding
            slot_token = torch.where(slot_assign < a, slot_assign // k, n)  # n = the zero row
            xs = _PaddedGather.apply(xf, slot_token, pos, k).view(e, cap, d)
            ys = _PaddedGather.apply(self.experts.batched(xs).view(e * cap, d).to(xf.dtype), pos, slot_assign, 1)
        else:
            inv = torch.empty_like(order)
            inv[order] = torch.arange(a, device=order.device)
            xs = _GatherRepeated.apply(xf, order // k, inv, k)
            ys = _Permute.apply(self.experts(xs, counts).to(xf.dtype), inv, order)
        return (ys.view(n, k, d) * r.gate.view(n, k, 1).to(xf.dtype)).sum(1).to(xf.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        shape = x.shape
        if x.dim() == 2:  # a single sequence of tokens
            x = x.unsqueeze(0)
        elif x.dim() != 3:
            x = x.reshape(-1, shape[-2], shape[-1])
        b, t, d = x.shape
        n = b * t
        xf = x.reshape(n, d)
        r = self.route(x)
        if self.expert_map is not None and r.expert_idx.numel() > 0:
            r = dataclasses.replace(r, expert_idx=self.expert_map[r.expert_idx])
        dropped = torch.zeros((), device=x.device)
        out = None
        if r.expert_idx.numel() > 0 and r.k_per_token is not None and self.capacity_factor is None:
            out = self._dispatch_fixed_k(xf, r, r.k_per_token)
        elif r.expert_idx.numel() > 0:
            order, counts, dropped = self._plan(r, n)
            tok, gate = r.token_idx[order], r.gate[order]
            ys = self.experts(xf.index_select(0, tok), counts).to(x.dtype) * gate.unsqueeze(-1).to(x.dtype)
            out = xf.new_zeros(n, d).index_add(0, tok, ys)
        elif r.extra is None:  # nothing routed (e.g. ReLU gates all zero): keep experts in the graph
            out = xf.new_zeros(n, d) + 0 * sum(p.sum() for p in self.experts.parameters())
        if r.extra is not None:
            out = r.extra if out is None else out + r.extra
        if self.shared is not None:
            out = out + self.shared(xf)
        aux = {"loss": r.loss, "load": r.load.detach(), "router_entropy": r.entropy,
               "dropped_fraction": dropped.detach(), **r.stats}
        return out.reshape(shape), aux


class ConvMoE(nn.Module):
    """An MoE over the positions of a channel-first feature map ``(B, C, *grid)``.

    Positions are flattened to tokens ``(B, prod(grid), C)``, passed through :class:`MoE` and
    reshaped back, so a stage-one ResNet block can host experts; returns ``(y, aux)`` like MoE.
    No residual is added here: the hosting block owns its skip connection.
    """

    def __init__(self, channels: int, **moe_params: Any) -> None:
        super().__init__()
        self.moe = MoE(channels, **moe_params)

    @property
    def causal_safe(self) -> bool:
        return self.moe.causal_safe

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b, c = x.shape[:2]
        tokens = x.reshape(b, c, -1).transpose(1, 2)
        y, aux = self.moe(tokens)
        return y.transpose(1, 2).reshape(x.shape), aux
