"""Masked (MaskGIT-style) GIVT: a bidirectional transformer that fills in masked real-valued latents.

GIVT's second variant (Tschannen et al. 2023, Sec. 3; big_vision's ``style="masked"``): the causal
transformer of :class:`stage2.givt.GIVT` becomes bidirectional over ``[class token, N latents]``, the
input projection of each masked latent is REPLACED by a learned mask embedding (big_vision's
``mask_style="replace"``; a continuous input has no table row to spare), and the same Gaussian-mixture
head predicts every position. Training masks a schedule-drawn fraction of each sequence
(:func:`stage2.maskgit.random_mask`, MaskGIT's cosine schedule by default) and minimises the exact
mixture NLL averaged over the masked positions only (``sum(nll * mask) / sum(mask)``, as big_vision's
trainer and MaskGIT's cross-entropy). As in big_vision the progress ``r`` is drawn from
``U(0, 1 - min_masking_rate)`` (default 0.3: with cosine at least ~45% of the positions are masked);
``min_masking_rate = 0`` is MaskGIT's ``U(0, 1)``.

Sampling (:func:`masked_gmm_decode`) follows big_vision's ``parallel_decode``: at each of ``T`` steps
every still-masked position draws a latent from its mixture (DB-CFG's rejection sampler when
``cfg_scale > 0``); its confidence is the log density of that draw under the law it was drawn from
plus Gumbel noise scaled by ``choice_temperature * (1 - (t + 1) / T)``; positions fixed earlier have
confidence +inf (never re-sampled), and the ``floor(gamma((t + 1) / T) * N)`` least confident new
draws go back under the mask (:func:`stage2.maskgit.remask_counts`). With DB-CFG the confidence is
the guided log density ``(1 + w) log p_c - w log p_u`` of the full mixtures (big_vision uses that of
the drawn component only; both are unnormalised and serve only to rank positions).

``val/loss`` (nats per masked position) and ``val/bits_per_dim_masked`` are masked-prediction losses at
random mask ratios, NOT a likelihood of the sequence: they do not compare with causal GIVT's bits/dim.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from layers.transformer import Transformer
from stage2.givt import GIVT, GIVT_SAMPLING
from stage2.gmm import DBCFGStats, GaussianMixture, db_cfg_sample
from stage2.maskgit import MaskGITPrior, _lowest_ranks, gumbel_noise, random_mask, remask_counts
from stage2.options import SamplingOption, non_negative_float, positive_int
from stage2.prior import PriorLoss
from stage2.schedules import get_schedule

# mixtures_fn(latents (B, N, d) with unknown positions zeroed, unknown (B, N)) ->
#   (conditional mixtures (B, N, ...), unconditional mixtures or None when not guiding)
MixturesFn = Callable[[Tensor, Tensor], tuple[GaussianMixture, GaussianMixture | None]]


def _option(options: Sequence[SamplingOption], name: str) -> SamplingOption:
    return next(o for o in options if o.name == name)


def _select(gmm: GaussianMixture, where: Tensor) -> GaussianMixture:
    """The mixtures at the True positions of ``where`` (B, N), flattened to ``(M, ...)``."""
    return GaussianMixture(gmm.logits[where], gmm.loc[where], gmm.scale[where])


@torch.no_grad()
def masked_gmm_decode(
    mixtures_fn: MixturesFn,
    batch: int,
    length: int,
    dim: int,
    *,
    steps: int = 16,
    temperature: float = 1.0,
    choice_temperature: float = 1.0,
    cfg_scale: float = 0.0,
    schedule: str = "cosine",
    max_rejection_samples: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    init: Tensor | None = None,
    fill: Tensor | None = None,
) -> tuple[Tensor, DBCFGStats]:
    """Iterative parallel decoding of ``(B, N, d)`` latents in ``steps`` calls of ``mixtures_fn``.

    ``init`` (B, N, d) and ``fill`` (B, N) bool: infilling; the positions where ``fill`` is False keep
    their ``init`` value from the start and are never re-drawn (``fill`` defaults to all True).
    Returns the latents (no position left masked) and the DB-CFG statistics (empty without guidance).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = torch.device(device)
    unknown = torch.ones(batch, length, dtype=torch.bool, device=device) if fill is None \
        else fill.to(device=device, dtype=torch.bool).clone()
    z = torch.zeros(batch, length, dim, device=device) if init is None else init.to(device).float().clone()
    z = z.masked_fill(unknown[..., None], 0.0)
    stats = DBCFGStats()
    for t in range(steps):
        cond, uncond = mixtures_fn(z, unknown)
        cond = _select(cond.with_temperature(temperature), unknown)
        if uncond is None:
            drawn = cond.sample(generator)
            logp = cond.log_prob(drawn)
        else:
            uncond = _select(uncond.with_temperature(temperature), unknown)
            drawn, step = db_cfg_sample(cond, uncond, cfg_scale, generator, max_samples=max_rejection_samples)
            stats.add(step)
            logp = (1 + cfg_scale) * cond.log_prob(drawn) - cfg_scale * uncond.log_prob(drawn)
        sampled = z.clone()
        sampled[unknown] = drawn
        confidence = torch.full((batch, length), float("inf"), device=device)
        noise_scale = choice_temperature * (1.0 - (t + 1) / steps)
        confidence[unknown] = logp + noise_scale * gumbel_noise(logp.shape, generator, device)
        remask = _lowest_ranks(confidence, remask_counts(t, steps, length, unknown.sum(dim=1), schedule))
        z = sampled.masked_fill(remask[..., None], 0.0)
        unknown = remask
    return z, stats


class GIVTMaskGIT(GIVT):
    """Class-conditional masked GIVT over continuous latents ``(B, *grid, d)``.

    Args:
        mask_schedule: gamma of :mod:`stage2.schedules` for the training masks and (by default) decoding.
        min_masking_rate: training progress ``r ~ U(0, 1 - min_masking_rate)`` (big_vision: 0.3).
        **givt: :class:`stage2.givt.GIVT`'s arguments (head, normalisation, transformer, base).
    """

    sampling_options = (
        SamplingOption("steps", positive_int, 16, "parallel decoding steps (big_vision: 16)"),
        _option(GIVT_SAMPLING, "temperature"),
        SamplingOption("choice_temperature", non_negative_float, 1.0,
                       "Gumbel noise on the confidences (annealed to 0; big_vision: 1)"),
        _option(GIVT_SAMPLING, "cfg_scale"),
        _option(MaskGITPrior.sampling_options, "schedule"),
        _option(GIVT_SAMPLING, "max_rejection_samples"),
    )

    def __init__(self, mask_schedule: str = "cosine", min_masking_rate: float = 0.3, **givt: Any):
        super().__init__(**givt)
        get_schedule(mask_schedule)  # fail at construction, not at the first step
        if not 0.0 <= min_masking_rate < 1.0:
            raise ValueError(f"min_masking_rate must be in [0, 1), got {min_masking_rate}")
        self.mask_schedule, self.min_masking_rate = mask_schedule, float(min_masking_rate)
        self.mask_token = nn.Parameter(torch.randn(self.dim) * 0.02)

    def make_transformer(self) -> Transformer:
        """Bidirectional over the class token (an unrotated prefix for rope2d) and the N latents."""
        return self.build_transformer(causal=False, num_prefix=1)

    def training_mask(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """``(B, N)`` True where the input is masked: ``ceil(gamma(r) N)`` uniformly placed positions."""
        r = torch.rand(batch, generator=generator, device=self.device) * (1.0 - self.min_masking_rate)
        return random_mask(r, self.seq_len, self.mask_schedule, generator=generator)

    def forward(self, codes: Tensor, labels: Tensor | None, mask: Tensor
                ) -> tuple[GaussianMixture, Tensor, dict[str, Tensor]]:
        """Mixtures at every latent position given the unmasked ones, normalised targets ``(B, N, d)``, aux.

        ``codes``: latents shaped like codes, in the tokenizer's units; ``mask`` ``(B, N)``: True where
        the input is replaced by the mask embedding (its value is never read).
        """
        z = self.normalize(self.flatten_codes(codes))
        gmm, aux = self.predict(z, labels, mask)
        return gmm, z, aux

    def predict(self, z: Tensor, labels: Tensor | None, mask: Tensor) -> tuple[GaussianMixture, dict[str, Tensor]]:
        """The network on normalised latents ``(B, N, d)``: mask embedding where ``mask``, class token first."""
        x = torch.where(mask[..., None], self.mask_token.to(z.dtype), self.embed.tokens(z))
        x = torch.cat([self.classes(labels, z.shape[0])[:, None], self.embed.add_levels(x)], dim=1)
        h, aux = self.transformer(x)
        return self.head(h[:, 1:]), aux

    def loss(self, codes: Tensor, labels: Tensor | None, context: Tensor | None = None,
             generator: torch.Generator | None = None) -> PriorLoss:
        """Exact mixture NLL averaged over the masked positions; the objective is nats per dimension."""
        mask = self.training_mask(codes.shape[0], generator)
        gmm, z, aux = self(codes, labels, mask)
        return self.nll_loss(-gmm.log_prob(z)[mask].mean(), aux, "bits_per_dim_masked",
                             masked_fraction=mask.float().mean())

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: int | Sequence[int] | Tensor | None = None,
        steps: int = 16,
        temperature: float = 1.0,
        choice_temperature: float = 1.0,
        cfg_scale: float = 0.0,
        schedule: str | None = None,
        max_rejection_samples: int = 1000,
        generator: torch.Generator | None = None,
        context: Tensor | None = None,
        init: Tensor | None = None,
        fill: Tensor | None = None,
    ) -> Tensor:
        """Sample ``n`` latent grids ``(n, *grid, d)`` in the tokenizer's units in ``steps`` parallel steps.

        ``init`` (latents shaped like a sample) with ``fill`` (``(n, *grid)`` bool, True = generate):
        infilling; the other positions are returned exactly as given. ``cfg_scale`` is DB-CFG's ``w``
        (acceptance in ``last_sampling_stats``); ``schedule`` defaults to the training one.
        """
        if cfg_scale < 0:
            raise ValueError(f"the DB-CFG weight cfg_scale must be >= 0, got {cfg_scale}")
        schedule = schedule or self.mask_schedule
        get_schedule(schedule)
        labels, guided = self.guidance_labels(n, cond, cfg_scale)
        if (init is None) != (fill is None):
            raise ValueError("infilling needs both init (the latents) and fill (True where to generate)")
        init_flat = None if init is None else self.flatten_codes(init.to(self.device)).float()
        fill_flat = None if fill is None else fill.to(self.device, torch.bool).reshape(n, self.seq_len)

        def mixtures_fn(z: Tensor, unknown: Tensor) -> tuple[GaussianMixture, GaussianMixture | None]:
            if not guided:
                return self.predict(z, labels, unknown)[0], None
            gmm = self.predict(z.repeat(2, 1, 1), labels, unknown.repeat(2, 1))[0]
            return (GaussianMixture(gmm.logits[:n], gmm.loc[:n], gmm.scale[:n]),
                    GaussianMixture(gmm.logits[n:], gmm.loc[n:], gmm.scale[n:]))

        self.last_sampling_stats = {}
        with self.evaluating():
            z, stats = masked_gmm_decode(
                mixtures_fn, n, self.seq_len, self.latent_dim, steps=steps, temperature=temperature,
                choice_temperature=choice_temperature, cfg_scale=cfg_scale if guided else 0.0, schedule=schedule,
                max_rejection_samples=max_rejection_samples, generator=generator, device=self.device,
                init=None if init_flat is None else self.normalize(init_flat), fill=fill_flat)
        if guided:
            self.last_sampling_stats = {"dbcfg_acceptance": stats.acceptance, "dbcfg_success": stats.success}
        out = self.denormalize(z)
        if init_flat is not None:  # kept positions exactly as given (no normalise/denormalise round-off)
            out = torch.where(fill_flat[..., None], out, init_flat)
        return self.unflatten_codes(out)
