"""SparseMixer-v2 (Liu et al., "GRIN: GRadient-INformed MoE", 2024; "Sparse Backpropagation for MoE
Training", 2023): a gradient estimator for the discrete expert choice, instead of top-k's
straight-through use of the softmax probability.

Per token and per selection round (round 2 masks the round-1 expert out of the logits ``s``):

1. *Sparsity mask*: logits far below the round's maximum, ``(max - s_i) / max(|s_i|, max) > 2 eps``,
   are set to ``-inf`` (they could never win under multiplicative jitter ``eps``).
2. *Choice*: in training expert D is **sampled** from ``pi = softmax(masked s)`` (Gumbel-max);
   in evaluation D is the argmax.
3. *Gate*: ``pi_D``, scaled in the forward by ``1/3`` with probability 3/4 when D is not the
   argmax (Heun's third-order rule ``f(x) - f(0) ~ 1/4 f'(x) + 3/4 f'(x/3)``, realised by
   evaluating the expert's contribution at a third of its gate) and by 1 otherwise.
4. *Backward*: the router receives ``dL/dgate * pi_D (e_D - pi)``, the gradient of ``pi_D``
   whatever the forward scaling was (the authors' ``v2core``).

Gates are not renormalised. The balance loss is Switch's, ``E sum_i f_i P_i`` on the unmasked
softmax. GRIN uses top-2 with ``eps = 0.01``; top-1 and top-2 are supported, as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import Routing
from .router_losses import balance_loss, entropy, load_fraction
from .routers import Router


class _GateOfSample(torch.autograd.Function):
    """Forward ``pi_D * scale``; backward ``grad * pi_D * (onehot(D) - pi)`` into the logits."""

    @staticmethod
    def forward(ctx, logits: Tensor, pi: Tensor, chosen: Tensor, scale: Tensor) -> Tensor:
        pi_d = pi.gather(-1, chosen)
        ctx.save_for_backward(pi, pi_d, chosen)
        return pi_d * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        pi, pi_d, chosen = ctx.saved_tensors
        g = grad * pi_d
        grad_logits = (pi * -g).scatter_add(-1, chosen, g)
        return grad_logits, None, None, None


def _sparsity_mask(round_logits: Tensor, logits: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(mask of logits that jitter ``eps`` could never lift to the top, argmax of the round)."""
    top, arg = round_logits.max(dim=-1, keepdim=True)
    factor = logits.abs().clamp(min=top)
    return (top - logits) / factor > 2 * eps, arg


class SparseMixerRouter(Router):
    """SparseMixer-v2 routing (GRIN): sampled top-1/top-2 with the midpoint gradient estimator."""

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, jitter_eps: float = 0.01,
                 balance_weight: float = 0.01) -> None:
        super().__init__(dim, num_experts)
        if top_k not in (1, 2):
            raise ValueError(f"SparseMixer routes top-1 or top-2 (as the authors' code), got top_k={top_k}")
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} > num_experts={num_experts}")
        self.top_k, self.jitter_eps, self.balance_weight = top_k, jitter_eps, balance_weight
        self.proj = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: Tensor) -> Routing:
        logits = F.linear(x.reshape(-1, self.dim).float(), self.proj.weight.float())
        gates, chosen = [], []
        round_logits = logits
        for _ in range(self.top_k):
            with torch.no_grad():
                far, arg = _sparsity_mask(round_logits, logits, self.jitter_eps)
                masked = round_logits.masked_fill(far, float("-inf"))
                if self.training:  # Gumbel-max sample from softmax(masked)
                    d = (masked - torch.empty_like(masked).exponential_().log()).argmax(-1, keepdim=True)
                else:
                    d = arg
                pi = masked.softmax(-1)
                at_max = d == pi.argmax(-1, keepdim=True)
                scale = torch.where(at_max | (torch.rand_like(pi[:, :1]) > 0.75), 1.0, 1.0 / 3.0)
            gates.append(_GateOfSample.apply(logits, pi, d, scale))
            chosen.append(d)
            round_logits = round_logits.scatter(-1, d, float("-inf"))  # the next round excludes D
        gate = torch.cat(gates, dim=-1).reshape(-1)
        expert_idx = torch.cat(chosen, dim=-1).reshape(-1)
        probs = logits.softmax(-1)
        load = load_fraction(expert_idx, self.num_experts)
        bal = balance_loss(load, probs.mean(0))
        n = logits.shape[0]
        token_idx = torch.arange(n, device=x.device).repeat_interleave(self.top_k)
        return Routing(token_idx, expert_idx, gate, self.balance_weight * bal, load, entropy(probs),
                       {"balance_loss": bal.detach()}, k_per_token=self.top_k)
