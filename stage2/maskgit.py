"""MaskGIT prior (Chang et al. 2022): a bidirectional transformer that fills in masked code tokens.

Training masks a schedule-drawn fraction of each code sequence and learns to predict the masked
tokens; sampling starts from an all-mask sequence and, over ``T`` steps, predicts every masked
token in parallel, keeps the most confident predictions and re-masks the rest.

The masking and decoding logic are plain functions written against a ``logits_fn`` callable, so
they are tested on their own (tests count model calls and track the mask step by step) and the
LightningModule only adds the network, the class conditioning and classifier-free guidance.

The prior's sequence is ``[class token, code tokens]``: the class token is a class embedding, with
index ``num_classes`` as the null class (used for label dropout, classifier-free guidance and by an
unconditional prior, whose only class is the null one). Code tokens are flattened row-major over
the grid, depth-minor for residual codes (as in :mod:`stage2.ar`); token ``codebook_size`` is the
mask. With rope2d, the class token is an unrotated prefix and the code tokens are rotated by their
grid coordinates (and depth level, for residual codes).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage2.context import ContextGrid, context_inputs
from stage2.options import TOKEN_SAMPLING, SamplingOption, non_negative_float, positive_int
from stage2.prior import PriorLoss
from stage2.sampling import cfg_logits, filter_logits
from stage2.schedules import get_schedule, mask_ratio
from stage2.transformer_prior import TransformerPrior, init_gpt_weights

# logits_fn(tokens (B, N) with mask ids, step t) -> logits (B, N, V) over the V real codes.
LogitsFn = Callable[[Tensor, int], Tensor]


def keep_rows(text: str) -> str:
    """Parse ``--keep``: half-open ranges of the first grid axis, ``"0:8,24:32"`` (a bare ``"3"`` is row 3);
    returned as given (it is recorded in ``samples.json``), rejected here when malformed."""
    try:
        ranges = [_row_range(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ranges such as 0:8,24:32, got {text!r}") from None
    if any(a < 0 or b <= a for a, b in ranges):
        raise argparse.ArgumentTypeError(f"each range start:stop needs 0 <= start < stop, got {text!r}")
    return text


def _row_range(part: str) -> tuple[int, int]:
    a, _, b = part.strip().partition(":")
    return (int(a), int(b)) if b else (int(a), int(a) + 1)


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def infill_init(codes: Tensor, keep: str, n: int, mask_id: int) -> Tensor:
    """``n`` infilling starts from ``codes`` ``(m, *grid[, depth])`` (item ``i % m`` for sample ``i``):
    the grid rows (first axis) that ``keep`` names stay, every other code becomes ``mask_id``."""
    rows = torch.zeros(codes.shape[1], dtype=torch.bool)
    for a, b in (_row_range(part) for part in keep_rows(keep).split(",")):
        if b > codes.shape[1]:
            raise ValueError(f"keep range {a}:{b} leaves the code grid's first axis of {codes.shape[1]} rows")
        rows[a:b] = True
    init = codes[torch.arange(n) % len(codes)].long().clone()
    init[:, ~rows] = mask_id
    return init


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
    """Sample one token per row of ``logits`` ``(..., V)``; return it and its log-probability under the
    sampling law.

    Same order as :func:`stage2.sampling.sample_from_logits` (temperature, then top-k/top-p), but
    the log-probabilities are needed as confidences, so the steps are spelled out here. Temperature
    0 is greedy; the confidences then come from the untempered (filtered) softmax, so the ranking of
    positions is still meaningful.

    Sampled with top-k alone, only the ``k`` kept logits are normalised and drawn from (the law of
    ``filter_logits``, whose masked tokens have probability 0; when the k-th and (k+1)-th logits tie,
    ``filter_logits`` keeps every tie and so does the fallback to the full rows here). A draw is one
    uniform per row against the cumulative probabilities (:func:`_categorical`), not
    ``torch.multinomial``, whose CPU path draws an exponential variate for every entry of the row.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    choices = None
    if temperature > 0 and top_k is not None and top_p is None and 1 <= top_k < logits.shape[-1]:
        values, index = logits.topk(top_k + 1, dim=-1)  # descending; the extra one tells a tie at the k-th
        if not (values[..., top_k] == values[..., top_k - 1]).any():
            logits, choices, top_k = values[..., :top_k], index[..., :top_k], None
    logp = torch.log_softmax(filter_logits(logits, top_k, top_p), dim=-1)
    if temperature == 0:
        tokens = logp.argmax(dim=-1)
    else:
        tokens = _categorical(logp.reshape(-1, logp.shape[-1]).exp(), generator).reshape(logp.shape[:-1])
    picked = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if choices is not None:
        tokens = choices.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, picked


def _categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of ``probs`` ``(R, V)`` (rows need not sum to 1): inverse CDF with one uniform per
    row. A token of probability 0 is never drawn (its cumulative sum equals its predecessor's)."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


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
    init: Tensor | None = None,
) -> Tensor:
    """Iterative parallel decoding: ``steps`` calls of ``logits_fn``, returns (B, N) codes, no mask left.

    ``init`` (B, N): infilling; its tokens other than ``mask_id`` are fixed from the start and never change.

    At step t every masked position gets a sampled token; its confidence is its log-probability
    plus Gumbel noise scaled by ``choice_temperature * (1 - (t + 1) / T)`` (MaskGIT anneals the
    randomness of the choice linearly to 0; with t counted from 1 this is ``1 - t / T``, and the last
    step, which re-masks nothing, gets no noise). Tokens fixed at earlier steps get confidence +inf, so
    only newly predicted tokens can be re-masked: the ``remask_counts`` least confident of them.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    tokens = torch.full((batch, length), mask_id, dtype=torch.long, device=device) if init is None \
        else init.to(device=device, dtype=torch.long).clone()
    for t in range(steps):
        unknown = tokens == mask_id
        logits = logits_fn(tokens, t)
        if logits.shape[:2] != (batch, length) or logits.shape[-1] > mask_id:
            raise ValueError(
                f"logits_fn must return (B, N, V) with V <= mask id {mask_id} (the mask is never a "
                f"prediction), got {tuple(logits.shape)} for tokens {tuple(tokens.shape)}"
            )
        # only the still-masked positions are sampled and scored: fixed tokens keep their code and
        # confidence +inf, so drawing (and noising) theirs would be thrown away
        drawn, logp = _sample_tokens(logits[unknown], temperature, top_k, top_p, generator)
        sampled = tokens.masked_scatter(unknown, drawn)
        noise_scale = choice_temperature * (1.0 - (t + 1) / steps)
        confidence = torch.full((batch, length), float("inf"), device=device)
        confidence[unknown] = logp + noise_scale * gumbel_noise(logp.shape, generator, device)
        n_remask = remask_counts(t, steps, length, unknown.sum(dim=1), schedule)
        remask = _lowest_ranks(confidence, n_remask)
        tokens = sampled.masked_fill(remask, mask_id)
    return tokens


class MaskGITPrior(TransformerPrior):
    """Class-conditional (or unconditional) masked-token prior with MaskGIT's parallel decoding.

    Args:
        positions: of the transformer (always bidirectional); defaults to learned absolute embeddings,
            as in MaskGIT: at the first decoding step every input is the mask token, and only absolute
            positions tell the cells apart (with rotary positions the model must infer them from
            grid-border effects, and learns far more slowly). ``rope2d`` and ``rope1d`` work too.
        mask_schedule: gamma of :mod:`stage2.schedules` used to draw training masks and, unless
            ``sample(schedule=...)`` says otherwise, to decode.
        label_smoothing: cross-entropy label smoothing on the masked positions (MaskGIT uses 0.1).
        **prior: the other transformer arguments (:class:`stage2.transformer_prior.TransformerPrior`)
            and the base arguments of :class:`stage2.prior.Prior` (codes, code_spec, num_classes, ...).
    """

    accepts_context = True  # context_level: a conditioning code grid added per cell (stage2.context)
    sampling_options = (
        SamplingOption("steps", positive_int, 8, "parallel decoding steps"),
        *TOKEN_SAMPLING,
        SamplingOption("choice_temperature", non_negative_float, 4.5, "Gumbel noise on the confidences (to 0)"),
        SamplingOption("cfg_ramp", bool, False, "raise the guidance scale linearly over the steps"),
        SamplingOption("schedule", str, None, "mask schedule for decoding (default: the training one)"),
        SamplingOption("infill", existing_file, None, "infilling: a .npy of codes (m, *grid), e.g. a code shard "
                       "or a sample's codes.npy; sample i starts from item i %% m of each batch, --keep rows fixed"),
        SamplingOption("keep", keep_rows, None, "with --infill: the grid rows (first axis) kept, as ranges "
                       "start:stop[,start:stop] (music_vq: 4 codes per bar, so 0:8 keeps bars 1-2)"),
    )

    def __init__(self, positions: str = "learned", mask_schedule: str = "cosine", label_smoothing: float = 0.1,
                 **prior: Any):
        super().__init__(positions=positions, **prior)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        get_schedule(mask_schedule)  # fail at construction, not at the first training step
        self.mask_schedule = mask_schedule
        self.label_smoothing = label_smoothing
        self.mask_id = self.codebook_size
        dim = self.dim
        self.transformer = self.build_transformer(causal=False, num_prefix=1)  # the class token is the prefix
        self.embed = self.code_embedding(dim, extra_tokens=1)  # last row = the mask token
        self.classes = self.class_embedding(dim)
        self.head = nn.Linear(dim, self.codebook_size)  # the mask is never a prediction
        ctx = self.context_layout()
        self.context = ContextGrid(ctx, self.layout, dim) if ctx is not None else None
        self.apply(init_gpt_weights)

    def _flat_tokens(self, tokens: Tensor) -> Tensor:
        """Accept codes ``(B, *grid[, depth])`` or already-flat tokens ``(B, N)`` (mask ids allowed)."""
        if tokens.dim() == 2 and tokens.shape[1] == self.seq_len:
            return tokens.long()
        return self.flatten_codes(tokens)

    def forward(self, tokens: Tensor, labels: Tensor | None = None,
                context: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits ``(B, N, V)`` over the real codes at every code position, and the aux dict.

        ``tokens``: codes with ``mask_id`` where unknown, shaped like codes or flat ``(B, N)``.
        ``labels``: ``(B,)`` classes, the null class where dropped; ``None`` = all null.
        """
        flat = self._flat_tokens(tokens)
        codes = self.embed(flat)
        ctx = context_inputs(self.context, context, flat.shape[0])  # the conditioning grid, added per cell
        x = torch.cat([self.classes(labels, flat.shape[0])[:, None], codes if ctx is None else codes + ctx], dim=1)
        h, aux = self.transformer(x)
        return self.head(h[:, 1:]), aux

    def loss(self, codes: Tensor, labels: Tensor | None, context: Tensor | None = None,
             generator: torch.Generator | None = None) -> PriorLoss:
        """Mask a schedule-drawn fraction of each sample; cross-entropy on the masked positions only.

        Label smoothing applies in training only; ``nll`` is the plain cross-entropy (a training loss,
        not a likelihood of the sequence).
        """
        target = self.flatten_codes(codes)
        b, n = target.shape
        r = torch.rand(b, generator=generator, device=target.device)
        mask = random_mask(r, n, self.mask_schedule, generator=generator)
        logits, aux = self(target.masked_fill(mask, self.mask_id), labels, context)
        picked, wanted = logits[mask].float(), target[mask]
        smoothing = self.label_smoothing if self.training else 0.0
        loss = F.cross_entropy(picked, wanted, label_smoothing=smoothing)
        nll = loss.detach() if smoothing == 0 else F.cross_entropy(picked.detach(), wanted)
        stats = {"masked_acc": (picked.detach().argmax(-1) == wanted).float().mean()}
        return PriorLoss(loss, nll, aux, stats)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: int | Sequence[int] | Tensor | None = None,
        steps: int = 8,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        choice_temperature: float = 4.5,
        cfg_scale: float = 0.0,
        cfg_ramp: bool = False,
        schedule: str | None = None,
        generator: torch.Generator | None = None,
        context: Tensor | None = None,
        init: Tensor | None = None,
        infill: str | Tensor | None = None,
        keep: str | None = None,
    ) -> Tensor:
        """Sample ``n`` code grids ``(n, *grid[, depth])`` in ``steps`` parallel decoding steps.

        ``init``: infilling; codes shaped like a sample with ``self.mask_id`` where they are to be
        filled (e.g. whole bars of music); the others stay exactly as given. ``infill`` + ``keep``
        build ``init`` (the command line's way, see :func:`infill_init`): codes ``(m, *grid[, depth])``
        or a ``.npy`` file of them, and the grid rows to keep, e.g. ``"0:8"``.

        ``cond``: None (the null class), one class for all, or ``n`` classes. ``cfg_scale`` guides as
        ``cond + s * (cond - uncond)`` with both branches in one batched forward (needs ``cond``;
        ``s = 0`` is plain conditional sampling); ``cfg_ramp`` raises the scale linearly over the
        steps, ``s * (t + 1) / steps``, so the first, most uncertain steps are guided least.
        ``schedule`` defaults to the training ``mask_schedule``; ``choice_temperature`` scales the
        Gumbel noise on the confidences (annealed to 0 over the steps).
        """
        schedule = schedule or self.mask_schedule
        get_schedule(schedule)
        if (infill is None) != (keep is None) or (infill is not None and init is not None):
            raise ValueError("infilling needs both infill (codes) and keep (rows), and not init as well")
        if infill is not None:
            codes = torch.from_numpy(np.load(infill).astype(np.int64)) if isinstance(infill, str) else infill
            shape = (*self.grid, *([self.code_depth] if self.code_depth else []))
            if tuple(codes.shape[1:]) != shape or int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size:
                raise ValueError(f"infill codes {tuple(codes.shape)} in [{int(codes.min())}, {int(codes.max())}] "
                                 f"do not fit this prior: (m, {', '.join(map(str, shape))}) in "
                                 f"[0, {self.codebook_size})")
            init = infill_init(codes, keep, n, self.mask_id)
        labels, guided = self.guidance_labels(n, cond, cfg_scale)

        def logits_fn(tokens: Tensor, step: int) -> Tensor:
            if not guided:
                return self(tokens, labels, context)[0].float()
            logits = self(tokens.repeat(2, 1), labels, context)[0].float()
            scale = cfg_scale * (step + 1) / steps if cfg_ramp else cfg_scale
            return cfg_logits(logits[:n], logits[n:], scale)

        with self.evaluating():
            flat = maskgit_decode(
                logits_fn, n, self.seq_len, self.mask_id, steps=steps, temperature=temperature, top_k=top_k,
                top_p=top_p, choice_temperature=choice_temperature, schedule=schedule, generator=generator,
                device=self.device, init=None if init is None else self._flat_tokens(init),
            )
        return self.unflatten_codes(flat)
