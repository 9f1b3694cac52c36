"""MaskGIT prior (Chang et al. 2022): a bidirectional transformer that fills in masked code tokens.

Training masks a schedule-drawn fraction of each code sequence and learns to predict the masked
tokens; sampling starts from an all-mask sequence and, over ``T`` steps, predicts every masked
token in parallel, keeps the most confident predictions and re-masks the rest.

The masking and decoding logic are plain functions written against a ``logits_fn`` callable, so
they are tested on their own (tests count model calls and track the mask step by step) and the
LightningModule only adds the network, the class conditioning and classifier-free guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from stage2.sampling import filter_logits
from stage2.schedules import mask_ratio

# logits_fn(tokens (B, N) with mask ids, step t) -> logits (B, N, V) over the V real codes.
LogitsFn = Callable[[Tensor, int], Tensor]


def mask_counts(r: Tensor, length: int, schedule: str = "cosine") -> Tensor:
    """Training mask size ceil(gamma(r) * N), at least 1 (a sample with nothing masked has no loss)."""
    counts = torch.ceil(mask_ratio(schedule, r.double()) * length).long()
    return counts.clamp(1, length)


def _lowest_ranks(scores: Tensor, counts: Tensor) -> Tensor:
    """Boolean (B, N): True at each row's ``counts[b]`` lowest scores (ties broken by position)."""
    order = scores.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks < counts.unsqueeze(1)


def random_mask(
    r: Tensor, length: int, schedule: str = "cosine", generator: torch.Generator | None = None
) -> Tensor:
    """Mask of shape (B, N) with exactly ``mask_counts(r)`` uniformly placed True entries per row."""
    counts = mask_counts(r, length, schedule).to(r.device)
    noise = torch.rand(r.shape[0], length, generator=generator, device=r.device)
    return _lowest_ranks(noise, counts)


def remask_counts(step: int, steps: int, length: int, unknown: Tensor, schedule: str = "cosine") -> Tensor:
    """How many still-predicted tokens go back under the mask after ``step`` (0-based) of ``steps``.

    floor(gamma((t + 1) / T) * N), clamped as in MaskGIT so that every step but the last fixes at
    least one token (``<= unknown - 1``) and keeps at least one masked (``>= 1``), and the last
    step re-masks nothing. ``unknown`` is the (B,) count of tokens that were masked going in.
    """
    if step >= steps - 1:
        return torch.zeros_like(unknown)
    target = math.floor(float(mask_ratio(schedule, (step + 1) / steps)) * length)
    counts = torch.clamp(torch.full_like(unknown, target), max=unknown - 1).clamp(min=1)
    return torch.minimum(counts, unknown)  # never more than what is still unknown: fixed stay fixed


def gumbel_noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def _sample_tokens(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Sample one token per position; return it and its log-probability under the sampling law.

    Same order as :func:`stage2.sampling.sample_from_logits` (temperature, then top-k/top-p), but
    the log-probabilities are needed as confidences, so the steps are spelled out here. Temperature
    0 is greedy; the confidences then come from the untempered (filtered) softmax, so the ranking of
    positions is still meaningful.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    logp = torch.log_softmax(filter_logits(logits, top_k, top_p), dim=-1)
    if temperature == 0:
        tokens = logp.argmax(dim=-1)
    else:
        flat = logp.reshape(-1, logp.shape[-1]).exp()
        tokens = torch.multinomial(flat, 1, generator=generator).reshape(logp.shape[:-1])
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def maskgit_decode(
    logits_fn: LogitsFn,
    batch: int,
    length: int,
    mask_id: int,
    *,
    steps: int = 8,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    choice_temperature: float = 4.5,
    schedule: str = "cosine",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Iterative parallel decoding: ``steps`` calls of ``logits_fn``, returns (B, N) codes, no mask left.

    At step t every masked position gets a sampled token; its confidence is its log-probability
    plus Gumbel noise scaled by ``choice_temperature * (1 - (t + 1) / T)`` (MaskGIT anneals the
    randomness of the choice linearly to 0). Tokens fixed at earlier steps get confidence +inf, so
    only newly predicted tokens can be re-masked: the ``remask_counts`` least confident of them.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    tokens = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
    for t in range(steps):
        unknown = tokens == mask_id
        logits = logits_fn(tokens, t)
        if logits.shape[:2] != (batch, length) or logits.shape[-1] > mask_id:
            raise ValueError(
                f"logits_fn must return (B, N, V) with V <= mask id {mask_id} (the mask is never a "
                f"prediction), got {tuple(logits.shape)} for tokens {tuple(tokens.shape)}"
            )
        sampled, logp = _sample_tokens(logits, temperature, top_k, top_p, generator)
        sampled = torch.where(unknown, sampled, tokens)
        noise_scale = choice_temperature * (1.0 - (t + 1) / steps)
        confidence = logp + noise_scale * gumbel_noise(logp.shape, generator, device)
        confidence = torch.where(unknown, confidence, torch.full_like(confidence, float("inf")))
        n_remask = remask_counts(t, steps, length, unknown.sum(dim=1), schedule)
        remask = _lowest_ranks(confidence, n_remask)
        tokens = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
    return tokens
