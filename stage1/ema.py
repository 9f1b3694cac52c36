"""Exponential moving average of a module's parameters, kept as buffers so it checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ParameterEMA(nn.Module):
    """Shadow copies of ``module``'s trainable parameters, updated by ``update()`` after each step.

    ``swapped()`` temporarily loads the averaged weights into the live module (for validation,
    tokenizing and sampling) and restores the trained weights afterwards.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self._names = [n for n, p in module.named_parameters() if p.requires_grad]
        for i, n in enumerate(self._names):
            self.register_buffer(f"shadow_{i}", module.get_parameter(n).detach().clone())
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _pairs(self, module: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, n in enumerate(self._names):
            yield getattr(self, f"shadow_{i}"), module.get_parameter(n)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        # Warm-up as in LitEma: early on the average follows the weights closely.
        n = float(self.num_updates)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        shadows, params = zip(*self._pairs(module))
        torch._foreach_lerp_(list(shadows), [p.detach() for p in params], 1.0 - decay)

    @contextmanager
    def swapped(self, module: nn.Module) -> Iterator[None]:
        with torch.no_grad():
            backup = [p.detach().clone() for _, p in self._pairs(module)]
            for s, p in self._pairs(module):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), b in zip(self._pairs(module), backup):
                    p.copy_(b)
