"""Mask-ratio schedules gamma(r) for masked-token priors (MaskGIT, Chang et al. 2022).

A schedule maps the decoding progress ``r`` in [0, 1] to the fraction of tokens that are still
masked: gamma(0) = 1 (everything masked) and gamma(1) = 0 (nothing masked), decreasing in between.
The same function serves both phases of MaskGIT: at training time ``r ~ U(0, 1)`` draws how many
tokens to mask, and at sampling time ``gamma((t + 1) / T)`` says how many to keep masked after step
``t`` of ``T``. The paper finds concave schedules (cosine, square, cubic) best, because they fix
few tokens in the first, most uncertain steps and many at the end; convex ones (sqrt, log, exp)
are kept for ablations.

Schedules are plain functions on tensors, looked up by name so that a config or a ``sample()``
call names them with a string.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Schedule = Callable[[Tensor], Tensor]

# Decay rate of the "exp" schedule: large enough to be clearly convex (front-loaded), small enough
# that the last steps still fix a few tokens each.
_EXP_RATE = 5.0


def cosine(r: Tensor) -> Tensor:
    """cos(pi r / 2): the MaskGIT default (concave)."""
    return torch.cos(r * (math.pi / 2))


def linear(r: Tensor) -> Tensor:
    """1 - r: a constant number of tokens fixed per step."""
    return 1.0 - r


def square(r: Tensor) -> Tensor:
    """1 - r^2 (concave)."""
    return 1.0 - r * r


def cubic(r: Tensor) -> Tensor:
    """1 - r^3 (concave, even fewer tokens fixed early)."""
    return 1.0 - r**3


def sqrt(r: Tensor) -> Tensor:
    """1 - sqrt(r) (convex: many tokens fixed in the first step)."""
    return 1.0 - torch.sqrt(r)


def log(r: Tensor) -> Tensor:
    """1 - log2(1 + r) (convex)."""
    return 1.0 - torch.log2(1.0 + r)


def exp(r: Tensor) -> Tensor:
    """(e^{-k r} - e^{-k}) / (1 - e^{-k}) with k = 5: convex, normalised to hit exactly 1 and 0."""
    floor = math.exp(-_EXP_RATE)
    return (torch.exp(-_EXP_RATE * r) - floor) / (1.0 - floor)


SCHEDULES: dict[str, Schedule] = {
    "cosine": cosine,
    "linear": linear,
    "square": square,
    "cubic": cubic,
    "sqrt": sqrt,
    "log": log,
    "exp": exp,
}


def get_schedule(name: str) -> Schedule:
    """Look a schedule up by name; an unknown name fails with the list of valid ones."""
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown mask schedule {name!r}; valid schedules: {', '.join(sorted(SCHEDULES))}"
        ) from None


def mask_ratio(name: str, r: Tensor | float) -> Tensor:
    """gamma(r) for the named schedule, with ``r`` clamped to [0, 1] and the result to [0, 1].

    Clamping the output guards against float round-off (e.g. cos(pi/2) = -4e-8) turning into a
    negative or over-full mask count downstream.
    """
    # Python numbers are evaluated in float64 so that mask counts floor(gamma * N) are exact.
    r = r if isinstance(r, Tensor) and r.is_floating_point() else torch.as_tensor(r, dtype=torch.float64)
    r = r.clamp(0.0, 1.0)
    return get_schedule(name)(r).clamp(0.0, 1.0)
