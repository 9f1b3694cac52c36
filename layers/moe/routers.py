"""Token-choice and expert-choice routers: each a small class implementing one paper's method.

Every router maps ``x`` (B, T, D) to a :class:`~layers.moe.contract.Routing` over the ``N = B*T``
flattened tokens. Router logits are computed in float32 whatever the activation dtype (ST-MoE's
advice: routing decisions are sensitive to round-off).

- :class:`TopKRouter`: softmax top-k gating with the Switch/GShard balance loss and the ST-MoE
  z-loss (Fedus et al. 2021, Lepikhin et al. 2020, Zoph et al. 2022). With ``renormalize=False``
  and ``MoE(num_shared=...)`` it is DeepSeekMoE's gating (Dai et al. 2024).
- :class:`AuxFreeRouter`: DeepSeek-V3's auxiliary-loss-free balancing (selection-only bias).
- :class:`ExpertChoiceRouter`: experts pick their top-c tokens of the batch (Zhou et al. 2022); not
  causal-safe.
- :class:`ReLURouter`: ReMoE (Wang et al. 2024), ReLU gates, adaptive L1 toward sparsity 1 - k/E.
- :class:`MoEPlusPlusRouter`: MoE++ (Jin et al. 2024), zero/copy/constant experts, gating residuals.

Soft MoE lives in :mod:`layers.moe.soft` since it routes densely by design; DynMoE's top-any router,
with its expert add/remove, in :mod:`layers.moe.top_any`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import Routing
from .router_losses import balance_loss, entropy, load_fraction, z_loss


class Router(nn.Module):
    """Base class: ``num_experts`` FFN experts, ``num_choices`` everything the router can pick.

    ``causal_safe`` is False for routers whose decision for one token depends on other tokens of
    the sequence: a causal prior must refuse them.
    """

    causal_safe: bool = True

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.dim, self.num_experts = dim, num_experts
        self.num_choices = num_experts

    def _zero(self, x: Tensor) -> Tensor:
        return x.new_zeros((), dtype=torch.float32)


def _topk_assignments(probs: Tensor, k: int, renormalize: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k over the last dim; returns flat (token_idx, expert_idx, gate)."""
    top_p, top_i = probs.topk(k, dim=-1)
    if renormalize and k > 1:
        top_p = top_p / top_p.sum(-1, keepdim=True)
    n = probs.shape[0]
    token_idx = torch.arange(n, device=probs.device).repeat_interleave(k)
    return token_idx, top_i.reshape(-1), top_p.reshape(-1)


class TopKRouter(Router):
    """Softmax top-k gating (top-1 = Switch, top-2 = GShard) with balance and z-losses.

    ``renormalize`` rescales the k selected probabilities to sum to one (for k > 1; for top-1 the
    raw probability is kept, as Switch does, so that the router still gets a gradient).
    ``balance_weight`` weighs ``E * sum_i f_i P_i`` (1 at perfect balance), ``z_loss_weight`` the
    ST-MoE z-loss. ``jitter`` multiplies router inputs by U(1-j, 1+j) noise in training (Switch).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, renormalize: bool = True,
                 balance_weight: float = 0.01, z_loss_weight: float = 1e-3, jitter: float = 0.0) -> None:
        super().__init__(dim, num_experts)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.top_k, self.renormalize = top_k, renormalize
        self.balance_weight, self.z_loss_weight, self.jitter = balance_weight, z_loss_weight, jitter
        self.proj = nn.Linear(dim, num_experts, bias=False)

    def logits(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, self.dim)
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
        return F.linear(x.float(), self.proj.weight.float())

    def forward(self, x: Tensor) -> Routing:
        logits = self.logits(x)
        # One log-softmax gives probabilities, the log-partition (z-loss) and the entropy: few
        # small ops, which matters on a busy CPU where each parallel op pays a synchronisation.
        logp = logits.log_softmax(-1)
        probs = logp.exp()
        token_idx, expert_idx, gate = _topk_assignments(probs, self.top_k, self.renormalize)
        load = load_fraction(expert_idx, self.num_experts)
        bal = balance_loss(load, probs.mean(0))
        zl = (logits[:, 0] - logp[:, 0]).square().mean()  # logsumexp(logits)^2
        loss = self.balance_weight * bal + self.z_loss_weight * zl
        with torch.no_grad():
            ent = -(probs * logp).sum(-1).mean()
        return Routing(token_idx, expert_idx, gate, loss, load, ent,
                       {"balance_loss": bal.detach(), "z_loss": zl.detach()}, k_per_token=self.top_k)


class AuxFreeRouter(Router):
    """DeepSeek-V3 auxiliary-loss-free balancing.

    Scores are ``sigmoid(x W)``; a per-expert ``bias`` (a buffer, never trained by gradient) is
    added to them for the top-k *selection only*; the gates are the unbiased scores of the selected
    experts, normalised to sum to one (times ``route_scale``). In every training forward the bias
    moves by ``bias_update_rate * sign(mean load - load_i)``: overloaded experts get pushed down,
    idle ones up. (Under activation checkpointing the forward runs twice and so does the update.)
    ``seq_balance_weight`` adds V3's small complementary sequence-wise balance loss (0 = off).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, bias_update_rate: float = 1e-3,
                 route_scale: float = 1.0, seq_balance_weight: float = 0.0) -> None:
        super().__init__(dim, num_experts)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.top_k, self.bias_update_rate, self.route_scale = top_k, bias_update_rate, route_scale
        self.seq_balance_weight = seq_balance_weight
        self.proj = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("bias", torch.zeros(num_experts))

    def forward(self, x: Tensor) -> Routing:
        b, t = x.shape[0], x.shape[1]
        scores = torch.sigmoid(F.linear(x.reshape(-1, self.dim).float(), self.proj.weight.float()))
        _, top_i = (scores.detach() + self.bias).topk(self.top_k, dim=-1)
        sel = scores.gather(-1, top_i)
        gates = sel / sel.sum(-1, keepdim=True) * self.route_scale
        expert_idx = top_i.reshape(-1)
        load = load_fraction(expert_idx, self.num_experts)
        if self.training:
            with torch.no_grad():
                self.bias += self.bias_update_rate * torch.sign(load.mean() - load)
        norm_scores = scores / scores.sum(-1, keepdim=True)
        loss = self._zero(x)
        stats = {"bias_abs_mean": self.bias.abs().mean()}
        if self.seq_balance_weight > 0:
            # Per sequence: f_i = E/(kT) * #tokens choosing i, P_i = mean normalised score.
            counts = torch.zeros(b, self.num_experts, device=x.device).scatter_add_(
                1, top_i.view(b, t * self.top_k), torch.ones(b, t * self.top_k, device=x.device))
            f = counts * self.num_experts / (self.top_k * t)
            p = norm_scores.view(b, t, self.num_experts).mean(1)
            seq = (f * p).sum(-1).mean()
            loss = self.seq_balance_weight * seq
            stats["seq_balance_loss"] = seq.detach()
        token_idx = torch.arange(scores.shape[0], device=x.device).repeat_interleave(self.top_k)
        return Routing(token_idx, expert_idx, gates.reshape(-1), loss, load, entropy(norm_scores), stats,
                       k_per_token=self.top_k)


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-c tokens.

    Token-to-expert affinities are ``S = softmax(X W)`` over experts for the ``n`` tokens of a
    routing group; expert e selects the ``c = ceil(n * capacity_factor / E)`` tokens with the
    highest ``S[:, e]`` and weighs each by that affinity. With ``group="batch"`` (the default, the
    paper's) the group is the whole batch, ``n = B*T``; ``group="sequence"`` routes every sequence
    separately (``n = T``, c experts' worth of each sequence). A token may be taken by several
    experts or by none. Load is balanced by construction, so there is no balance loss. The choice
    for a token depends on other tokens (future ones and, per batch, other samples), hence
    ``causal_safe = False``.
    """

    causal_safe = False

    def __init__(self, dim: int, num_experts: int, capacity_factor: float = 2.0, group: str = "batch",
                 z_loss_weight: float = 0.0) -> None:
        super().__init__(dim, num_experts)
        if group not in ("batch", "sequence"):
            raise ValueError(f"group must be 'batch' (the paper's) or 'sequence', got {group!r}")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
        self.capacity_factor, self.group, self.z_loss_weight = capacity_factor, group, z_loss_weight
        self.proj = nn.Linear(dim, num_experts, bias=False)

    def capacity(self, n: int) -> int:
        """Tokens each expert takes from a group of ``n``: ``ceil(n * capacity_factor / E)`` in [1, n]."""
        return max(1, min(n, math.ceil(n * self.capacity_factor / self.num_experts)))

    def forward(self, x: Tensor) -> Routing:
        b, t = x.shape[0], x.shape[1]
        g, n = (1, b * t) if self.group == "batch" else (b, t)
        logits = F.linear(x.reshape(g, n, self.dim).float(), self.proj.weight.float())
        probs = logits.softmax(-1)  # (G, n, E)
        c = self.capacity(n)
        gate, tok = probs.topk(c, dim=1)  # (G, c, E): expert e's chosen tokens in each group
        token_idx = (tok + torch.arange(g, device=x.device).view(g, 1, 1) * n).reshape(-1)
        expert_idx = torch.arange(self.num_experts, device=x.device).expand(g, c, -1).reshape(-1)
        load = load_fraction(expert_idx, self.num_experts)
        picked = torch.zeros(b * t, dtype=torch.bool, device=x.device)
        picked[token_idx] = True
        zl = z_loss(logits)
        stats = {"capacity": torch.tensor(float(c)), "unrouted_fraction": 1.0 - picked.float().mean()}
        return Routing(token_idx, expert_idx, gate.reshape(-1), self.z_loss_weight * zl, load,
                       entropy(probs.reshape(-1, self.num_experts)), stats)


class ReLURouter(Router):
    """ReMoE (Wang et al. 2024): gates ``ReLU(x W)``, sparsity steered by an adaptive L1 penalty.

    Every positive gate is an assignment, so the number of experts per token varies and the gate
    is continuous (differentiable everywhere except at 0). The penalty is
    ``l1_coeff * mean_t sum_e f_e * gate_te`` with ``f_e = E/(kN) * #tokens routed to e`` (the
    paper's load-balancing refinement; ``balanced_l1=False`` gives plain L1). After every training
    forward ``l1_coeff *= l1_update ** sign(target - sparsity)`` with target sparsity ``1 - k/E``:
    too dense raises the penalty, too sparse lowers it.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, l1_init: float = 1e-8,
                 l1_update: float = 1.2, balanced_l1: bool = True) -> None:
        super().__init__(dim, num_experts)
        self.top_k, self.l1_update, self.balanced_l1 = top_k, l1_update, balanced_l1
        self.target_sparsity = 1.0 - top_k / num_experts
        self.proj = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("l1_coeff", torch.tensor(float(l1_init)))

    def forward(self, x: Tensor) -> Routing:
        gates = F.relu(F.linear(x.reshape(-1, self.dim).float(), self.proj.weight.float()))
        active = gates > 0
        token_idx, expert_idx = active.nonzero(as_tuple=True)
        n = gates.shape[0]
        counts = active.sum(0).float()
        sparsity = 1.0 - active.float().mean()
        f = counts * self.num_experts / (self.top_k * n) if self.balanced_l1 else torch.ones_like(counts)
        l1 = (gates * f.detach()).sum(-1).mean()
        coeff = self.l1_coeff.clone()  # the in-place update below must not touch the graph
        loss = coeff * l1
        stats = {"l1": l1.detach(), "l1_coeff": coeff, "sparsity": sparsity.detach(),
                 "experts_per_token": counts.sum() / n}
        if self.training:
            with torch.no_grad():
                self.l1_coeff *= self.l1_update ** torch.sign(self.target_sparsity - sparsity)
        dist = gates / gates.sum(-1, keepdim=True).clamp_min(1e-12)
        return Routing(token_idx, expert_idx, gates[token_idx, expert_idx], loss,
                       load_fraction(expert_idx, self.num_experts), entropy(dist), stats)


class MoEPlusPlusRouter(Router):
    """MoE++ (Jin et al. 2024): zero-computation experts routed beside the FFN experts.

    Choices are ``[FFN 0..E-1, zero..., copy..., constant...]``: a *zero* expert outputs 0
    (discard), a *copy* expert outputs x (skip), a *constant* expert j outputs
    ``a1 x + a2 v_j`` with ``[a1, a2] = softmax(x W_j)`` and a trained vector ``v_j`` (replace).
    The router computes those cheap outputs itself (returned as ``Routing.extra``); only FFN
    assignments are dispatched. Gating is softmax top-k over all choices; the balance loss weighs
    zero-computation choices by ``tau`` (the paper's heterogeneous balance loss).

    Gating residuals: with ``gating_residual`` the logits add ``prev_logits @ W_g`` where
    ``prev_logits`` are the previous MoE++ layer's logits of the same forward pass. The FFN slot
    contract passes only ``x``, so layers are chained explicitly by :func:`link_gating_residuals`
    (called once on the built model); an unlinked router simply routes without the residual.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, num_zero: int = 1, num_copy: int = 1,
                 num_constant: int = 2, tau: float = 0.75, renormalize: bool = False,
                 balance_weight: float = 0.01, z_loss_weight: float = 0.0,
                 gating_residual: bool = True) -> None:
        super().__init__(dim, num_experts)
        self.num_zero, self.num_copy, self.num_constant = num_zero, num_copy, num_constant
        self.num_choices = num_experts + num_zero + num_copy + num_constant
        if not 1 <= top_k <= self.num_choices:
            raise ValueError(f"top_k must be in [1, {self.num_choices}], got {top_k}")
        self.top_k, self.tau, self.renormalize = top_k, tau, renormalize
        self.balance_weight, self.z_loss_weight = balance_weight, z_loss_weight
        self.proj = nn.Linear(dim, self.num_choices, bias=False)
        self.const_mix = nn.Linear(dim, 2 * num_constant, bias=False)
        self.const_vectors = nn.Parameter(torch.randn(num_constant, dim) * dim**-0.5)
        self.gating_residual = gating_residual
        # W_g starts at zero: a linked layer begins routing exactly as an unlinked one.
        self.residual_proj = (nn.Parameter(torch.zeros(self.num_choices, self.num_choices))
                              if gating_residual else None)
        self._previous: list[MoEPlusPlusRouter] = []  # plain list: not registered as a submodule
        self._last_logits: Tensor | None = None
        eta = torch.cat([torch.ones(num_experts), torch.full((self.num_choices - num_experts,), float(tau))])
        self.register_buffer("eta", eta, persistent=False)

    def forward(self, x: Tensor) -> Routing:
        xf = x.reshape(-1, self.dim)
        n, e = xf.shape[0], self.num_experts
        logits = F.linear(xf.float(), self.proj.weight.float())
        prev = self._previous[0]._last_logits if self._previous else None
        if self.residual_proj is not None and prev is not None and prev.shape == logits.shape:
            logits = logits + prev @ self.residual_proj
        self._last_logits = logits if self._next_needs_logits else None
        probs = logits.softmax(-1)
        token_idx, choice_idx, gate = _topk_assignments(probs, self.top_k, self.renormalize)
        load = load_fraction(choice_idx, self.num_choices)
        is_ffn = choice_idx < e
        extra = self._zero_computation(xf, token_idx[~is_ffn], choice_idx[~is_ffn] - e, gate[~is_ffn], n)
        bal, zl = balance_loss(load, probs.mean(0), self.eta), z_loss(logits)
        loss = self.balance_weight * bal + self.z_loss_weight * zl
        stats = {"balance_loss": bal.detach(), "ffn_fraction": is_ffn.float().mean(),
                 "zero_computation_fraction": 1.0 - is_ffn.float().mean()}
        return Routing(token_idx[is_ffn], choice_idx[is_ffn], gate[is_ffn], loss, load, entropy(probs),
                       stats, extra)

    _next_needs_logits = False  # set by link_gating_residuals on every router that feeds a next one

    def _zero_computation(self, xf: Tensor, tok: Tensor, j: Tensor, gate: Tensor, n: int) -> Tensor:
        """Output of the zero/copy/constant choices: per token, gate-weighted, summed."""
        g = torch.zeros(n, self.num_choices - self.num_experts, device=xf.device, dtype=gate.dtype)
        g = g.index_put((tok, j), gate, accumulate=True)
        nz, nc = self.num_zero, self.num_copy
        g_copy = g[:, nz:nz + nc].sum(-1)  # zero experts (the first nz columns) contribute nothing
        g_const = g[:, nz + nc:]
        alpha = self.const_mix(xf).float().view(n, self.num_constant, 2).softmax(-1)
        scale_x = g_copy + (g_const * alpha[..., 0]).sum(-1)
        out = xf.float() * scale_x.unsqueeze(-1) + (g_const * alpha[..., 1]) @ self.const_vectors.float()
        return out.to(xf.dtype)


def link_gating_residuals(model: nn.Module) -> int:
    """Chain MoE++ routers of ``model`` in module order so each adds its predecessor's logits.

    Returns the number of links made. Call once after building the model; layers must run in
    module order within a forward pass (true for a transformer stack).
    """
    routers = [m for m in model.modules() if isinstance(m, MoEPlusPlusRouter) and m.gating_residual]
    for prev, nxt in zip(routers[:-1], routers[1:]):
        nxt._previous = [prev]
        prev._next_needs_logits = True
    return max(0, len(routers) - 1)
