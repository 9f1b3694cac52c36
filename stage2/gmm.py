"""GIVT's output head: a k-component Gaussian mixture with diagonal covariances per position.

Tschannen et al. 2023 (GIVT) replace the softmax over a vocabulary by the parameters of a mixture
of ``k`` Gaussians over the ``d``-dimensional real latent vector of each position. The layout
follows big_vision's GIVT (``per_channel_mixtures=False``): one linear layer emits ``k`` mixture
logits, then ``k`` means and ``k`` raw scales of ``d`` channels each; scales pass through the
"squareplus" ``(x + sqrt(x^2 + 4)) / 2`` (smooth, positive, ~x for large x) and are floored at
``scale_tol``. The layer starts at zero (as big_vision's ``LogitsDense``), so an untrained head is
``N(0, I)`` with uniform weights -- the right start for normalised latents.

:class:`GaussianMixture` holds those parameters and gives the exact log-likelihood (a log-sum-exp
over components of log weight + diagonal Gaussian log-density), sampling with a temperature that
scales every standard deviation (the paper's variance scaling), and DB-CFG, the paper's
distribution-based classifier-free guidance (:func:`db_cfg_sample`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def squareplus(x: Tensor) -> Tensor:
    """``(x + sqrt(x^2 + 4)) / 2``; for negative ``x`` as ``2 / (sqrt(x^2 + 4) - x)``, which is the same
    number without the cancellation that would round small scales to 0 in float32."""
    root = torch.sqrt(x * x + 4.0)
    return torch.where(x >= 0, 0.5 * (x + root), 2.0 / (root - x))


def normal_log_prob(x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """Element-wise ``log N(x; loc, scale^2)``."""
    return -0.5 * ((x - loc) / scale).pow(2) - torch.log(scale) - 0.5 * LOG_2PI


@dataclass
class GaussianMixture:
    """``logits (..., k)``, ``loc`` and ``scale`` ``(..., k, d)``: a mixture of diagonal Gaussians."""

    logits: Tensor
    loc: Tensor
    scale: Tensor

    @property
    def num_components(self) -> int:
        return self.logits.shape[-1]

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x)`` for ``x (..., d)``; returns ``(...)``."""
        comp = normal_log_prob(x.unsqueeze(-2), self.loc, self.scale).sum(-1)  # (..., k)
        return torch.logsumexp(F.log_softmax(self.logits, dim=-1) + comp, dim=-1)

    def with_temperature(self, temperature: float) -> GaussianMixture:
        """Every standard deviation times ``temperature`` (variance times its square); weights unchanged."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return GaussianMixture(self.logits, self.loc, self.scale * temperature)

    def sample_components(self, generator: torch.Generator | None = None) -> Tensor:
        """One component index per position ``(...)`` drawn from the mixture weights."""
        probs = self.logits.float().softmax(-1).reshape(-1, self.num_components)
        return torch.multinomial(probs, 1, generator=generator).view(self.logits.shape[:-1])

    def component(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``loc`` and ``scale`` ``(..., d)`` of the chosen component per position."""
        idx = index[..., None, None].expand(*index.shape, 1, self.loc.shape[-1])
        return self.loc.gather(-2, idx).squeeze(-2), self.scale.gather(-2, idx).squeeze(-2)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``x (..., d)``: a component from the weights, then ``loc + scale * eps``."""
        loc, scale = self.component(self.sample_components(generator))
        eps = torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
        return loc + scale * eps

    def to_torch(self) -> torch.distributions.MixtureSameFamily:
        """The same distribution as ``torch.distributions`` objects (for checks and users)."""
        D = torch.distributions
        return D.MixtureSameFamily(D.Categorical(logits=self.logits),
                                   D.Independent(D.Normal(self.loc, self.scale), 1))


class GMMHead(nn.Module):
    """``(..., dim)`` hidden states -> :class:`GaussianMixture` over ``latent_dim`` channels."""

    def __init__(self, dim: int, latent_dim: int, num_components: int = 16, scale_tol: float = 1e-6):
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.latent_dim, self.num_components, self.scale_tol = int(latent_dim), int(num_components), scale_tol
        self.proj = nn.Linear(dim, self.num_components * (1 + 2 * self.latent_dim))
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor) -> GaussianMixture:
        out = self.proj(h).float()
        k, d = self.num_components, self.latent_dim
        logits, rest = out[..., :k], out[..., k:].reshape(*out.shape[:-1], k, 2, d)
        scale = squareplus(rest[..., 1, :]).clamp_min(self.scale_tol)
        return GaussianMixture(logits, rest[..., 0, :], scale)


# -- DB-CFG ----------------------------------------------------------------------------------------
def _guided_log_density(x: Tensor, w: float, loc_c: Tensor, scale_c: Tensor, loc_u: Tensor, scale_u: Tensor) -> Tensor:
    """Unnormalised ``log p_c(x)^(1+w) / p_u(x)^w`` per element."""
    return (1 + w) * normal_log_prob(x, loc_c, scale_c) - w * normal_log_prob(x, loc_u, scale_u)


def _log_envelope(w: float, loc_c: Tensor, scale_c: Tensor, loc_u: Tensor, scale_u: Tensor,
                  prop_scale: Tensor, half_width: float) -> Tensor:
    """``max log(p̃ / q)`` over ``x in loc_c ± half_width`` (the paper's search interval), exactly.

    ``log p̃ - log q`` is a quadratic ``a x^2 + b x + c`` in ``x`` (all three terms are Gaussian
    exponents), so its maximum on the interval is at the vertex when ``a < 0`` and the vertex lies
    inside, else at an end. (big_vision scans a 1001-point grid and divides max p̃ by the proposal's
    peak density, which is not an upper bound of ``p̃ / q`` away from the centre; this is.)
    """
    pc, pu, pq = scale_c.pow(-2), scale_u.pow(-2), prop_scale.pow(-2)
    a = -0.5 * ((1 + w) * pc - w * pu - pq)
    b = (1 + w) * pc * loc_c - w * pu * loc_u - pq * loc_c
    lo, hi = loc_c - half_width, loc_c + half_width
    vertex = torch.where(a < 0, (-b / (2 * a)).clamp(min=lo, max=hi), lo)
    candidates = torch.stack([lo, hi, vertex])

    def ratio(x: Tensor) -> Tensor:
        return _guided_log_density(x, w, loc_c, scale_c, loc_u, scale_u) - normal_log_prob(x, loc_c, prop_scale)

    return ratio(candidates).amax(0)


@dataclass
class DBCFGStats:
    """How the rejection sampler did: ``acceptance`` = accepted draws / proposals evaluated (until the
    first acceptance of each element); ``success`` = fraction of elements accepted within ``max_samples``
    (the rest fall back to the conditional component, as in the paper's code)."""

    accepted: int = 0
    proposals: int = 0
    elements: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(1, self.proposals)

    @property
    def success(self) -> float:
        return self.accepted / max(1, self.elements)

    def add(self, other: DBCFGStats) -> None:
        self.accepted += other.accepted
        self.proposals += other.proposals
        self.elements += other.elements


def db_cfg_sample(
    cond: GaussianMixture,
    uncond: GaussianMixture,
    w: float,
    generator: torch.Generator | None = None,
    max_samples: int = 1000,
    chunk: int = 32,
    half_width: float = 10.0,
) -> tuple[Tensor, DBCFGStats]:
    """Distribution-based CFG (GIVT, Sec. 3): sample ``x ∝ p_c(x)^(1+w) / p_u(x)^w`` per position.

    The paper's procedure: draw a component from the CONDITIONAL mixture weights and take that
    component of both mixtures; the guided density of two diagonal Gaussians factorises over
    channels, so each channel is rejection-sampled on its own from the proposal
    ``N(loc_c, (2 max(scale_c, scale_u))^2)`` with envelope ``M = max p̃/q`` over ``loc_c ± 10``.
    Up to ``max_samples`` proposals per element, drawn ``chunk`` at a time until every element has
    accepted; an element that never accepts takes a draw of its conditional component. ``w = 0``
    targets the conditional component exactly (the sampler still runs; callers skip it for speed).
    Returns ``x (..., d)`` and :class:`DBCFGStats`.
    """
    if w < 0:
        raise ValueError(f"the DB-CFG weight must be >= 0, got {w}")
    index = cond.sample_components(generator)
    loc_c, scale_c = cond.component(index)
    loc_u, scale_u = uncond.component(index)
    prop_scale = 2 * torch.maximum(scale_c, scale_u)
    log_m = _log_envelope(w, loc_c, scale_c, loc_u, scale_u, prop_scale, half_width)

    out = torch.empty_like(loc_c)
    done = torch.zeros(loc_c.shape, dtype=torch.bool, device=loc_c.device)
    trials = torch.zeros(loc_c.shape, dtype=torch.long, device=loc_c.device)
    drawn = 0
    while drawn < max_samples and not bool(done.all()):
        n = min(chunk, max_samples - drawn)
        eps = torch.randn((n, *loc_c.shape), generator=generator, device=loc_c.device, dtype=loc_c.dtype)
        xs = loc_c + prop_scale * eps
        u = torch.rand((n, *loc_c.shape), generator=generator, device=loc_c.device, dtype=loc_c.dtype)
        log_ratio = (_guided_log_density(xs, w, loc_c, scale_c, loc_u, scale_u)
                     - normal_log_prob(xs, loc_c, prop_scale) - log_m)
        accept = torch.log(u) < log_ratio
        first = accept.float().argmax(0)  # first accepted proposal of this chunk (0 if none)
        hit = accept.any(0) & ~done
        out = torch.where(hit, xs.gather(0, first[None]).squeeze(0), out)
        trials += torch.where(done, 0, torch.where(hit, first + 1, n))
        done |= hit
        drawn += n
    fallback = loc_c + scale_c * torch.randn(loc_c.shape, generator=generator, device=loc_c.device,
                                             dtype=loc_c.dtype)
    out = torch.where(done, out, fallback)
    stats = DBCFGStats(accepted=int(done.sum()), proposals=int(trials.sum()), elements=done.numel())
    return out, stats
