"""The diagonal-Gaussian posterior of a KL-regularised autoencoder (β-VAE, LDM's AutoencoderKL, GIVT).

The encoder emits ``2 d`` channels per grid cell: the mean and the log-variance of
``q(z | x) = N(mean, diag(exp(logvar)))``. Training draws ``z = mean + std * eps`` (the
reparametrisation trick) and pays ``KL(q || N(0, I))`` in closed form::

    KL = 0.5 * sum_i (mean_i^2 + var_i - 1 - logvar_i)

summed over every latent element of a sample (channels and grid), as in big_vision's GIVT VAE
trainer and latent-diffusion's ``DiagonalGaussianDistribution``. The log-variance is clamped to
[-30, 20] (as latent diffusion does) so an untrained encoder cannot overflow ``exp``.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian:
    """``q(z|x)`` from channel-first moments ``(B, 2d, *grid)``: mean = first ``d``, logvar = last ``d``."""

    def __init__(self, moments: Tensor):
        if moments.shape[1] % 2:
            raise ValueError(f"moments need an even channel count (mean and logvar), got {moments.shape[1]}")
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` (differentiable in mean and logvar)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl_elements(self) -> Tensor:
        """``KL(q || N(0, I))`` per latent element, shape of ``mean``."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)

    def kl(self) -> Tensor:
        """KL per sample ``(B,)``: summed over channels and grid."""
        return self.kl_elements().flatten(1).sum(1)
