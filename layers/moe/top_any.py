"""DynMoE (Guo et al. 2024, "Dynamic Mixture of Experts: An Auto-Tuning Approach"): top-any gating
and the adaptive adding and removing of experts, as the authors' code does it.

Gating. ``num_experts`` is the pool of expert *slots*; a persistent mask says which are active.
For token x and active expert e the score is ``s_e = sigmoid(cos(x, w_e))`` (0 for inactive
slots), the threshold ``sigmoid(G_e)`` with a trainable ``G``, and the expert is on when
``s_e > sigmoid(G_e)``. A token uses its ``K = #on`` experts with equal weight:
``y = (1/K) sum_{e on} E_e(x)``. The on/off gate is ``sign(relu(s - sigmoid(G)))`` with an
identity backward through the sign, so keys and thresholds learn through ``relu``'s gradient
(``1/K * <dL/dy, E_e(x)>`` for every on expert, nothing for off ones).

Tokens that turn on no expert are handled as in the paper's code: in training they are routed
nowhere (the block's residual carries them) and recorded; in evaluation they take their
highest-scoring expert with weight 1.

Adaptive experts. In training the router records, over a window of ``adapt_every`` forwards, how
many tokens turned on each expert and the sum of the tokens that turned on none. At the end of a
window (applied at the start of the next training forward, after the previous backward, or by
calling :meth:`TopAnyRouter.adapt` from a training loop) it

1. removes every active expert that no token turned on during the window, then
2. if some token turned on no expert, activates the first inactive slot with key
   ``w_new = normalize(sum of those tokens)`` and threshold ``G_new = 0``,

and starts a new window. The official code runs this every training step for vision (window of 1)
and once per epoch for language; the default here is a window of 100 forwards.

Auxiliary loss (the official ``topanygating``): *diversity* ``||(W^ W^T - I) * (m m^T)||_F`` on
the normalised keys of active experts ``m``, *simplicity* ``mean_e ||w_e||`` over all slots,
*load balance* ``E * sum_e P_e f_e`` over routed tokens (``P_e`` mean of the gates normalised per
token, ``f_e`` the fraction of routed tokens that turned e on) and *efficiency* ``mean(gate)``
(fewer experts per token), each with its own weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import Routing
from .router_losses import entropy, load_fraction
from .routers import Router


class TopAnyRouter(Router):
    """DynMoE top-any gating with adaptive experts; ``num_experts`` is the slot pool.

    ``initial_experts`` slots start active (all when None). ``adaptive=False`` keeps the set of
    experts fixed (top-any gating alone). ``threshold_init`` is the initial ``G`` of every slot.
    """

    def __init__(self, dim: int, num_experts: int, initial_experts: int | None = None, adaptive: bool = True,
                 adapt_every: int = 100, balance_weight: float = 0.01, efficiency_weight: float = 0.01,
                 diversity_weight: float = 0.01, simplicity_weight: float = 0.01,
                 threshold_init: float = 0.0) -> None:
        super().__init__(dim, num_experts)
        initial = num_experts if initial_experts is None else initial_experts
        if not 1 <= initial <= num_experts:
            raise ValueError(f"initial_experts must be in [1, num_experts={num_experts}], got {initial_experts}")
        if adapt_every < 1:
            raise ValueError(f"adapt_every must be >= 1 forward, got {adapt_every}")
        self.adaptive, self.adapt_every = adaptive, adapt_every
        self.balance_weight, self.efficiency_weight = balance_weight, efficiency_weight
        self.diversity_weight, self.simplicity_weight = diversity_weight, simplicity_weight
        self.keys = nn.Parameter(torch.empty(num_experts, dim))
        nn.init.orthogonal_(self.keys)
        self.threshold = nn.Parameter(torch.full((num_experts,), float(threshold_init)))
        # Persistent: a checkpoint restores which experts exist and the open record window.
        self.register_buffer("active", torch.arange(num_experts) < initial)
        self.register_buffer("activation_counts", torch.zeros(num_experts))
        self.register_buffer("unrouted_sum", torch.zeros(dim))
        self.register_buffer("recorded_forwards", torch.zeros((), dtype=torch.long))

    def scores(self, x: Tensor) -> Tensor:
        """``sigmoid(cos(x, w_e))`` for active slots, 0 for inactive ones: (N, E) float32."""
        xf = F.normalize(x.reshape(-1, self.dim).float(), dim=-1)
        s = torch.sigmoid(xf @ F.normalize(self.keys.float(), dim=-1).t())
        return s * self.active

    def forward(self, x: Tensor) -> Routing:
        if self.training and self.adaptive and int(self.recorded_forwards) >= self.adapt_every:
            self.adapt()
        s = self.scores(x)
        margin = F.relu(s - torch.sigmoid(self.threshold.float()))
        hard = margin > 0
        gate = hard.float() + margin - margin.detach()  # value: sign(relu(.)); gradient: relu's
        k = hard.sum(-1)
        idle = k == 0
        if not self.training and idle.any():  # evaluation: an idle token takes its best expert
            best = F.one_hot(s.masked_fill(~self.active, -1.0).argmax(-1), self.num_experts).bool() & idle.unsqueeze(-1)
            hard = hard | best
            gate = gate + best.float()
            k = k.clamp_min(1)
        token_idx, expert_idx = hard.nonzero(as_tuple=True)
        weights = gate / k.clamp_min(1).unsqueeze(-1).to(gate.dtype)
        loss, stats = self._aux_loss(gate, hard, idle)
        if self.training and self.adaptive:
            self._record(x, hard, idle)
        stats.update(experts_per_token=k.float().mean(), idle_fraction=idle.float().mean(),
                     active_experts=self.active.sum().float())
        dist = s / s.sum(-1, keepdim=True).clamp_min(1e-12)
        return Routing(token_idx, expert_idx, weights[token_idx, expert_idx], loss,
                       load_fraction(expert_idx, self.num_experts), entropy(dist), stats)

    def _aux_loss(self, gate: Tensor, hard: Tensor, idle: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        keys = F.normalize(self.keys.float(), dim=-1)
        m = self.active.float()
        div = torch.linalg.matrix_norm((keys @ keys.t() - torch.eye(self.num_experts, device=keys.device))
                                       * torch.outer(m, m))
        simple = self.keys.float().norm(dim=-1).mean()
        routed = ~idle
        if routed.any():
            g = gate[routed]
            share = g / g.sum(-1, keepdim=True)
            bal = self.num_experts * (share.mean(0) * hard[routed].float().mean(0)).sum()
        else:
            bal = gate.sum() * 0.0
        eff = gate.mean()
        loss = (self.diversity_weight * div + self.simplicity_weight * simple + self.balance_weight * bal
                + self.efficiency_weight * eff)
        stats = {"diversity_loss": div.detach(), "simplicity_loss": simple.detach(),
                 "balance_loss": bal.detach(), "efficiency_loss": eff.detach()}
        return loss, stats

    @torch.no_grad()
    def _record(self, x: Tensor, hard: Tensor, idle: Tensor) -> None:
        self.activation_counts += hard.sum(0).float()
        self.unrouted_sum += x.reshape(-1, self.dim).float()[idle].sum(0)
        self.recorded_forwards += 1

    @torch.no_grad()
    def adapt(self) -> dict[str, list[int]]:
        """End the record window: remove experts no token used, add one for the unrouted tokens.

        Returns the slots removed and added. Call between optimiser steps (the router also calls
        it itself at the start of the first training forward after a full window).
        """
        removed, added = [], []
        if int(self.recorded_forwards) > 0:
            unused = self.active & (self.activation_counts == 0)
            removed = unused.nonzero().flatten().tolist()
            self.active &= ~unused
            norm = self.unrouted_sum.norm()
            free = (~self.active).nonzero().flatten()
            if norm > 0 and free.numel() > 0:
                e = int(free[0])
                self.active[e] = True
                self.keys[e] = (self.unrouted_sum / norm).to(self.keys.dtype)
                self.threshold[e] = 0.0
                added = [e]
        self.activation_counts.zero_()
        self.unrouted_sum.zero_()
        self.recorded_forwards.zero_()
        return {"removed": removed, "added": added}
