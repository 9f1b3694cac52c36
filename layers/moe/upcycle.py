"""Sparse upcycling (Komatsuzaki et al. 2022): turn a trained dense FFN into an MoE.

Every expert starts as an exact copy of the dense FFN and a fresh router is added. When the
router's gates sum to one per token (top-k with ``k >= 2`` and ``renormalize=True``, the default
here; DeepSeek-V3's aux-free router; DynMoE's 1/K gates) and nothing is dropped (the layer is
dropless by default), the upcycled layer computes exactly the dense output at step 0, since
``sum_e g_e FFN(x) = FFN(x)``; training then lets the copies drift apart.

:func:`upcycle_ffn` converts one :class:`~layers.mlp.MLP`; :func:`upcycle_transformer` replaces the
MLPs of a (trained) :class:`~layers.transformer.Transformer` in place, e.g. the backbone of a
trained prior before training continues.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from layers.mlp import MLP

from .layer import MoE

UPCYCLE_ROUTER = {"target": "layers.moe.TopKRouter", "params": {"renormalize": True}}


def upcycle_ffn(mlp: MLP, num_experts: int = 8, top_k: int = 2, router: Mapping[str, Any] | None = None,
                **moe_params: Any) -> MoE:
    """An :class:`MoE` whose ``num_experts`` experts are copies of ``mlp`` (SwiGLU, bias-free).

    ``router`` is a router spec (default: renormalised top-k); other keywords go to :class:`MoE`.
    A GELU MLP is refused: it has biases, which the stacked experts do not carry.
    """
    if mlp.kind != "swiglu":
        raise ValueError("upcycling needs a SwiGLU MLP (bias-free, like the experts); got a GELU MLP with biases")
    dim = mlp.w_in.in_features
    moe = MoE(dim, num_experts, top_k, mlp.hidden, router=dict(router or UPCYCLE_ROUTER),
              activation="swiglu", **moe_params)
    moe = moe.to(device=mlp.w_in.weight.device, dtype=mlp.w_in.weight.dtype)
    with torch.no_grad():
        # MLP: h = x W_in^T with the gate half first, y = h W_out^T; experts: x @ w_in[e], a @ w_out[e].
        moe.experts.w_in.copy_(mlp.w_in.weight.t().expand_as(moe.experts.w_in))
        moe.experts.w_out.copy_(mlp.w_out.weight.t().expand_as(moe.experts.w_out))
    return moe


def upcycle_transformer(model: nn.Module, num_experts: int = 8, top_k: int = 2,
                        router: Mapping[str, Any] | None = None, every: int = 1, **moe_params: Any) -> int:
    """Replace the MLP of every ``every``-th block of each Transformer inside ``model`` by its
    upcycled MoE (blocks ``every-1, 2*every-1, ...``, as the transformer's ``ffn_every``).

    Returns the number of FFNs replaced. A router that mixes tokens is refused in a causal model.
    """
    from layers.transformer import Transformer

    replaced = 0
    for transformer in [m for m in model.modules() if isinstance(m, Transformer)]:
        for i, block in enumerate(transformer.blocks):
            if (i + 1) % every or not isinstance(block.ffn, MLP):
                continue
            moe = upcycle_ffn(block.ffn, num_experts, top_k, router, **moe_params)
            if transformer.causal and not moe.causal_safe:
                raise ValueError(f"router {moe.router_name} is not causal-safe; cannot upcycle a causal model with it")
            block.ffn = moe
            replaced += 1
    return replaced
