"""Soft MoE (Puigcerver et al. 2023): experts process soft mixtures of tokens ("slots").

Each expert owns ``slots_per_expert`` slots with a learned key ``phi``. Slot inputs are convex
combinations of the sequence's tokens (dispatch weights: softmax over *tokens*), experts run on
their slots, and each token's output is a convex combination of all slot outputs (combine weights:
softmax over *slots*). Routing is dense by design, and all experts see the same number of slots, so
they run as one batched matmul. Every output depends on every token of the sequence, so the layer
is ``causal_safe = False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import Routing
from .router_losses import entropy
from .routers import Router


class SoftMoERouter(Router):
    """Soft MoE dispatch/combine. With ``normalize`` tokens and slot keys are L2-normalised and the
    logits scaled by a learned scalar (the paper's fix for logit growth at large widths)."""

    causal_safe = False
    soft = True

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, normalize: bool = True) -> None:
        super().__init__(dim, num_experts)
        self.slots_per_expert, self.normalize = slots_per_expert, normalize
        self.phi = nn.Parameter(torch.randn(dim, num_experts * slots_per_expert) * dim**-0.5)
        self.scale = nn.Parameter(torch.ones(())) if normalize else None

    def weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(dispatch, combine), each (B, T, E*S): dispatch sums to 1 over T, combine over slots."""
        xf, phi = x.float(), self.phi.float()
        if self.normalize:
            xf, phi = F.normalize(xf, dim=-1), self.scale * F.normalize(phi, dim=0)
        logits = xf @ phi
        return logits.softmax(dim=1), logits.softmax(dim=-1)

    def mix(self, x: Tensor, experts: nn.Module) -> Routing:
        """Run the whole Soft MoE on ``x`` (B, T, D) with ``experts.batched``; output in ``extra``."""
        b, t, d = x.shape
        e, s = self.num_experts, self.slots_per_expert
        dispatch, combine = self.weights(x)
        slots = torch.einsum("btn,btd->bnd", dispatch.to(x.dtype), x)  # (B, E*S, D)
        slots = slots.view(b, e, s, d).transpose(0, 1).reshape(e, b * s, d)
        out = experts.batched(slots).to(x.dtype).view(e, b, s, d).transpose(0, 1).reshape(b, e * s, d)
        y = torch.einsum("btn,bnd->btd", combine.to(x.dtype), out)
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        load = torch.full((e,), 1.0 / e, device=x.device)
        stats = {"dispatch_entropy": entropy(dispatch.transpose(1, 2).reshape(-1, t))}
        return Routing(empty, empty, x.new_zeros(0), x.new_zeros((), dtype=torch.float32), load,
                       entropy(combine.reshape(-1, e * s)), stats, y.reshape(b * t, d))

    def forward(self, x: Tensor) -> Routing:
        raise RuntimeError("SoftMoERouter routes densely; the MoE layer calls SoftMoERouter.mix(x, experts)")
