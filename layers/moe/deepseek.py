"""DeepSeekMoE (Dai et al. 2024): fine-grained expert segmentation with shared-expert isolation.

Start from a conventional MoE of ``num_experts`` (N) experts of hidden ``hidden_dim`` (H), top-K.
Segmentation splits every expert into ``granularity`` (m) experts of hidden ``H/m`` and activates
``mK`` of them, so total and active parameters stay those of the conventional layer while the
number of expert combinations grows. Isolation makes ``num_shared`` (K_s) of the ``mN`` fine
experts always active; the router chooses ``mK - K_s`` of the other ``mN - K_s``:

    y = sum_{i in top(mK-K_s)} s_i FFN_i(x) + sum_{j < K_s} FFN^shared_j(x),   s = softmax(x W)

with the raw softmax score as gate (no renormalisation) and the expert-level balance loss
``alpha * sum_i f_i P_i``, ``f_i = (mN-K_s)/((mK-K_s) T) * #tokens choosing i``, ``P_i`` the mean
score, which is :func:`~layers.moe.router_losses.balance_loss`. Built on :class:`MoE`; YAML:
``ffn: {target: layers.moe.DeepSeekMoE, params: {num_experts: 8, top_k: 2, granularity: 4, num_shared: 1}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .layer import MoE


class DeepSeekMoE(MoE):
    """The segmented layer: ``mN - K_s`` routed experts, ``mK - K_s`` active, ``K_s`` shared, hidden ``H/m``.

    ``router`` overrides DeepSeekMoE's gating (softmax top-k, raw scores, balance loss only).
    """

    def __init__(self, dim: int, num_experts: int = 8, top_k: int = 2, hidden_dim: int | None = None,
                 granularity: int = 4, num_shared: int = 1, balance_weight: float = 0.01,
                 router: Mapping[str, Any] | None = None, activation: str = "swiglu", **moe_params: Any) -> None:
        hidden = hidden_dim or 4 * dim
        if granularity < 1 or hidden % granularity:
            raise ValueError(f"granularity {granularity} must divide hidden_dim {hidden}")
        fine_total, fine_active = num_experts * granularity, top_k * granularity
        routed, active = fine_total - num_shared, fine_active - num_shared
        if not 0 <= num_shared < fine_active or active > routed:
            raise ValueError(f"num_shared must be in [0, granularity*top_k={fine_active}), got {num_shared}")
        router = router or {"target": "layers.moe.TopKRouter",
                            "params": {"renormalize": False, "balance_weight": balance_weight, "z_loss_weight": 0.0}}
        fine_hidden = hidden // granularity
        super().__init__(dim, routed, active, fine_hidden, router=router, activation=activation,
                         num_shared=num_shared, shared_hidden_dim=fine_hidden, **moe_params)
        self.granularity, self.num_shared_experts, self.fine_hidden = granularity, num_shared, fine_hidden
