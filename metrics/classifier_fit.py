"""The minibatch cross-entropy loop shared by the honest-named feature classifiers (image domain, spoken
digits, motion clips): shuffled epochs from a seeded generator, an optimiser step (and optional
scheduler step) per batch, the mean training loss per epoch reported to a callback."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fit_classifier(model: nn.Module, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, epochs: int,
                   batch_size: int, seed: int, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                   prepare: Callable[[Tensor], Tensor] | None = None,
                   on_epoch: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train ``model`` on ``(x, y)`` in place and return it in eval mode. ``prepare`` maps a batch of ``x``
    to the model's input (e.g. uint8 -> float on the model's device); ``on_epoch(epoch, mean_loss)``."""
    gen = torch.Generator().manual_seed(seed)
    y = y.long()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            xb = x[idx] if prepare is None else prepare(x[idx])
            loss = F.cross_entropy(model(xb), y[idx].to(xb.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if on_epoch is not None:
                total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / max(seen, 1))
    return model.eval()
