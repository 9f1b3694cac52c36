"""The router -> layer contract: what a router hands to the MoE layer (:class:`Routing`).

A sparse router returns its decision as a flat list of assignments ``(token, expert, gate)``:
top-k gives ``N*k`` of them, expert-choice ``E*c``, ReLU and top-any a variable number. The layer
sorts that list by expert and never builds a dense tokens x experts x capacity tensor. A router may
also hand back ``extra`` (N, D): output it computed itself (MoE++'s zero-computation experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Routing:
    """One routing decision over ``N`` flattened tokens.

    ``token_idx``, ``expert_idx`` (LongTensor (A,)) and ``gate`` (float (A,), differentiable) list
    every token-expert assignment. ``loss`` is the router's already-weighted auxiliary loss (a
    scalar), ``stats`` holds extra values to log (detached). ``load`` is the fraction of
    assignments per choice, over every choice the router has (FFN experts and, for MoE++, the
    zero-computation ones). ``extra`` is output computed by the router itself, added as it is.
    ``k_per_token`` = k when the assignments are exactly ``k`` per token in token-major order
    (``token_idx == arange(N).repeat_interleave(k)``): the layer then gathers and combines by
    permutation instead of scatter-add.
    """

    token_idx: Tensor
    expert_idx: Tensor
    gate: Tensor
    loss: Tensor
    load: Tensor
    entropy: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)
    extra: Tensor | None = None
    k_per_token: int | None = None
