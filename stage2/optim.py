"""Optimiser parameter groups and the warm-up + cosine learning-rate schedule of the priors.

Weight decay applies to the weight matrices of linear/conv layers and to expert weight stacks; it is
switched off for norms, biases and embeddings (token, level, class and learned position tables), as
in GPT-2/minGPT, LlamaGen and MaskGIT: decaying an embedding pulls rarely seen codes towards zero.

The schedule is torch's own: :class:`~torch.optim.lr_scheduler.LinearLR` warm-up (``(step + 1) /
warmup`` of the peak) then :class:`~torch.optim.lr_scheduler.CosineAnnealingLR` down to
``min_lr_ratio * lr`` at ``total`` steps, chained by :class:`~torch.optim.lr_scheduler.SequentialLR`.
(diffusers' ``get_cosine_schedule_with_warmup`` decays to 0, with no floor, so it is not used.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def _exempt_module(module: nn.Module) -> bool:
    """Norms and embedding tables (``nn.Embedding``, or a module named ``*Positions``/``*Embedding``)."""
    name = type(module).__name__
    return isinstance(module, _NO_DECAY_MODULES) or name.endswith(("Positions", "Embedding", "Norm"))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weight matrices, and everything else with ``weight_decay = 0``."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        exempt = _exempt_module(module)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if exempt or p.dim() < 2 or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int | None,
                  min_lr_ratio: float) -> LRScheduler:
    """Linear warm-up over ``warmup`` steps, then cosine to ``min_lr_ratio`` of the peak at ``total``.

    Without a ``total`` (or when ``total <= warmup``) the rate stays at its peak after warm-up.
    Step it once per optimiser step.
    """
    phases: list[LRScheduler] = []
    warmup = max(int(warmup), 0)
    if warmup:  # (step + 1) / warmup; one warm-up step is one step at the peak
        phases.append(LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
                      if warmup > 1 else ConstantLR(optimizer, factor=1.0, total_iters=0))
    if total and total > warmup:
        # the peak rate: LinearLR has already scaled "lr" down to the first warm-up step's value
        peaks = {g.get("initial_lr", g["lr"]) for g in optimizer.param_groups}
        if len(peaks) != 1:
            raise ValueError(f"warmup_cosine needs one peak rate for all parameter groups, got {sorted(peaks)}")
        phases.append(CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=peaks.pop() * min_lr_ratio))
    else:
        phases.append(ConstantLR(optimizer, factor=1.0, total_iters=0))
    if len(phases) == 1:
        return phases[0]
    return SequentialLR(optimizer, phases, milestones=[warmup])

