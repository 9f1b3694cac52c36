"""Statistics of a KL-VAE's continuous latents over many batches, as a torchmetrics ``Metric``.

What a prior over the latents cares about: the per-channel mean and standard deviation of the
posterior means (GIVT normalises its inputs with them), the mean posterior standard deviation, and
the KL to ``N(0, I)`` per latent dimension (channel), in nats per element. A channel whose KL is
near zero carries no information (posterior collapse). Sums are kept in float64 and reduced with
``sum`` so DDP ranks add up.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class LatentStatistics(Metric):
    """Accumulate ``mean`` and ``logvar`` of ``q(z|x)``, both ``(B, d, *grid)``.

    ``compute()`` returns per-channel tensors ``latent_mean``, ``latent_std`` (of the posterior
    means), ``posterior_std`` (average posterior std), ``kl_per_dim`` (nats per element) and the
    scalars ``kl_per_element`` (average over channels) and ``kl_per_sample`` (nats per sample).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, dim: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dim = int(dim)
        for name in ("sum", "sum_sq", "post_std", "kl"):
            self.add_state(name, default=torch.zeros(self.dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("samples", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mean: Tensor, logvar: Tensor) -> None:
        if mean.shape != logvar.shape or mean.shape[1] != self.dim:
            raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} must be (B, {self.dim}, ...)")
        m = mean.detach().double().transpose(0, 1).reshape(self.dim, -1)
        lv = logvar.detach().double().transpose(0, 1).reshape(self.dim, -1)
        self.sum += m.sum(1)
        self.sum_sq += m.pow(2).sum(1)
        self.post_std += torch.exp(0.5 * lv).sum(1)
        self.kl += (0.5 * (m.pow(2) + lv.exp() - 1.0 - lv)).sum(1)
        self.count += m.shape[1]
        self.samples += mean.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1.0)
        mean = self.sum / n
        std = (self.sum_sq / n - mean.pow(2)).clamp_min(0.0).sqrt()
        kl_per_dim = self.kl / n
        return {
            "latent_mean": mean.float(), "latent_std": std.float(), "posterior_std": (self.post_std / n).float(),
            "kl_per_dim": kl_per_dim.float(), "kl_per_element": kl_per_dim.mean().float(),
            "kl_per_sample": (self.kl.sum() / self.samples.clamp_min(1.0)).float(),
        }
