"""VQ-Diffusion prior (Gu et al. 2022) with the sampling of Improved VQ-Diffusion (Tang et al. 2022).

A bidirectional transformer predicts ``p(x_0 | x_t, y)`` over the real codes at every position of a
corrupted code grid ``x_t`` (codes, uniformly replaced codes and ``[MASK]``); the diffusion step
``t`` and the class ``y`` enter every block through AdaLN (one vector ``emb(t) + emb(y)``), with a
learned null class for label dropout and discrete classifier-free guidance. The forward process,
posterior and bound live in :mod:`stage2.discrete_diffusion`; this file holds the network, the
training loss and the samplers.

Training minimises the variational bound, ``L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))``
for ``t >= 2`` and ``-log p(x_0|x_1)`` at ``t = 1`` (the constant prior term ``L_T`` is left out),
plus ``aux_weight`` times the cross-entropy of ``p(x_0 | x_t)`` on every position (λ = 5e-4 in the
paper). Each sample's terms are divided by ``p(t)`` (uniform ``1/T``, or importance sampling), so the
loss estimates the whole bound, in nats per token.

Sampling (``sample``): ``steps`` reverse steps from ``x_T`` = all mask, each ``x_t -> x_s`` drawn from
``sum_{x_0} q(x_s | x_t, x_0) p(x_0 | x_t)``; ``steps < T`` skips steps with the exact skip-step
posterior. ``cfg_scale`` guides the log-probabilities of ``x_0`` (``cond + s (cond - uncond)``),
``truncation`` keeps the top-``r`` mass of ``p(x_0)``, and ``purity`` switches to the high-quality
inference of Improved VQ-Diffusion: each step unmasks as many positions as the schedule's ``gbar``
says, chosen with probability proportional to their purity ``max_j p(x_0 = j)`` (the most confident
first, as the official sampler), and never changes a token once it is unmasked.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from layers.norms import AdaptiveNorm
from stage2.discrete_diffusion import (
    DiscreteDiffusion,
    ImportanceStepSampler,
    guided_log_p_x0,
    stratified_steps,
    truncate,
)
from stage2.options import CFG_SCALE, SamplingOption, optional_float, optional_int
from stage2.prior import PriorLoss
from stage2.transformer_prior import TransformerPrior, init_gpt_weights

# log_p_x0_fn(x_t (B, N) with mask ids, t (B,) 1-based) -> log p(x_0 | x_t) (B, N, K), final (guided,
# truncated) distribution over the real codes.
LogPx0Fn = Callable[[Tensor, Tensor], Tensor]


def reverse_times(total: int, steps: int) -> list[int]:
    """``steps + 1`` descending times from ``total`` to 0, evenly spaced (skip-step when ``steps < total``)."""
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in [1, {total}], got {steps}")
    times = torch.linspace(total, 0, steps + 1, dtype=torch.float64).round().long().tolist()
    return list(dict.fromkeys(times))  # strictly decreasing, T first and 0 last


def diffusion_decode(
    log_p_x0_fn: LogPx0Fn,
    diffusion: DiscreteDiffusion,
    n: int,
    length: int,
    steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Ancestral sampling ``x_T -> ... -> x_0``; returns codes ``(n, length)`` in ``[0, K)``.

    ``x_T`` is all mask (``gbar_T ~ 1``). Each step samples the model's posterior; the last one
    (``s = 0``) samples ``p(x_0 | x_t)`` itself, which is that posterior exactly and never a mask.
    """
    x = torch.full((n, length), diffusion.mask_id, dtype=torch.long, device=device)
    times = reverse_times(diffusion.steps, steps)
    for t, s in zip(times[:-1], times[1:]):
        t_vec = torch.full((n,), t, dtype=torch.long, device=device)
        log_p = log_p_x0_fn(x, t_vec)
        if s == 0:
            return diffusion.sample_categorical(log_p, generator)
        x = diffusion.sample_categorical(diffusion.posterior(log_p, x, t_vec, s), generator)
    raise AssertionError("reverse_times always ends at 0")


def purity_decode(
    log_p_x0_fn: LogPx0Fn,
    diffusion: DiscreteDiffusion,
    n: int,
    length: int,
    steps: int,
    purity_weight: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Improved VQ-Diffusion's high-quality inference with the purity prior; codes ``(n, length)``.

    Going from ``t`` to ``s``, the number of masks left is ``round(length * gbar_s)`` (all gone at
    ``s = 0``); the positions to unmask are drawn without replacement among the masked ones with
    probability proportional to their purity (Gumbel top-k), and their tokens from
    ``softmax((1 + r * purity) * log p(x_0))`` (``r = purity_weight``, Eq. 11; ``r = 0`` is ``p(x_0)``),
    purity normalised by its maximum over the sequence as in the official sampler.
    """
    x = torch.full((n, length), diffusion.mask_id, dtype=torch.long, device=device)
    times = reverse_times(diffusion.steps, steps)
    for t, s in zip(times[:-1], times[1:]):
        masked = x == diffusion.mask_id
        keep_masked = round(length * float(diffusion.gbar[s])) if s > 0 else 0
        count = (masked.sum(1) - keep_masked).clamp_min(0)
        if not count.any():
            continue
        log_p = log_p_x0_fn(x, torch.full((n,), t, dtype=torch.long, device=device))
        purity = log_p.exp().amax(-1)
        purity = purity / purity.amax(1, keepdim=True).clamp_min(1e-10)
        if purity_weight > 0:
            log_p = ((1 + purity_weight * purity).unsqueeze(-1) * log_p).log_softmax(-1)
        drawn = diffusion.sample_categorical(log_p, generator)
        u = torch.rand(purity.shape, generator=generator, device=purity.device).clamp_min(1e-30)
        keys = torch.where(masked, purity.clamp_min(1e-30).log() - torch.log(-torch.log(u)), -math.inf)
        order = keys.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=x.device).expand_as(order))
        chosen = (ranks < count.unsqueeze(1)) & masked
        x = torch.where(chosen, drawn, x)
    return x


class VQDiffusionPrior(TransformerPrior):
    """Class-conditional (or unconditional) VQ-Diffusion prior over flat or residual code grids.

    Args:
        depth, norm, mlp, positions: VQ-Diffusion's defaults for the bidirectional transformer (AdaLN
            norms); it and its other arguments (dim, heads, mlp_ratio, dropout, ffn, ffn_every) are
            :class:`TransformerPrior`'s.
        diffusion_steps: ``T``. alpha_start, alpha_end, gamma_start, gamma_end: the ends of the linear
            cumulative schedules ``abar_1..abar_T`` and ``gbar_1..gbar_T`` (the paper's by default).
        aux_weight: λ of the auxiliary x_0 cross-entropy (5e-4 in the paper). adaptive_aux: the official
            code's extra weight ``2 - (t - 1) / T`` on it (heavier at small t).
        importance_sampling: draw t with ``p(t) ∝ sqrt(E[L_t^2])`` (uniform until every step was seen).
        **prior: the base arguments of :class:`stage2.prior.Prior` (codes, code_spec, num_classes,
            tokenizer, cond_drop_prob — the label dropout that trains the learned null class for
            discrete classifier-free guidance —, lr, weight_decay, betas, warmup_steps, max_steps,
            min_lr_ratio).
    """

    sampling_options = (
        SamplingOption("steps", optional_int, None, "reverse steps (default T; fewer = skip-step posterior)"),
        CFG_SCALE,
        SamplingOption("truncation", optional_float, None, "keep the top-r mass of p(x_0), e.g. 0.86"),
        SamplingOption("purity", bool, False, "Improved VQ-Diffusion's high-quality inference (purity prior)"),
        SamplingOption("purity_weight", float, 0.0, "r of Eq. 11: sharpen p(x_0) by (1 + r * purity)"),
    )

    def __init__(
        self,
        depth: int = 6,
        norm: str = "layernorm",
        mlp: str = "gelu",
        positions: str = "learned",
        diffusion_steps: int = 100,
        alpha_start: float = 0.99999,
        alpha_end: float = 0.000009,
        gamma_start: float = 0.000009,
        gamma_end: float = 0.99999,
        aux_weight: float = 5e-4,
        adaptive_aux: bool = False,
        importance_sampling: bool = False,
        **prior: Any,
    ):
        super().__init__(depth=depth, norm=norm, mlp=mlp, positions=positions, **prior)
        dim = self.dim
        self.aux_weight, self.adaptive_aux = float(aux_weight), bool(adaptive_aux)
        self.diffusion = DiscreteDiffusion(self.codebook_size, diffusion_steps, alpha_start, alpha_end,
                                           gamma_start, gamma_end)
        self.step_sampler = ImportanceStepSampler(diffusion_steps, importance_sampling)
        self.mask_id = self.diffusion.mask_id
        self.transformer = self.build_transformer(causal=False, cond_dim=dim)  # AdaLN on emb(t) + emb(y)
        self.embed = self.code_embedding(dim, extra_tokens=1)  # last row = [MASK]
        self.classes = self.class_embedding(dim)  # last row = the learned null class
        self.time_emb = nn.Embedding(diffusion_steps + 1, dim)  # t = 1..T (row 0 unused)
        self.head = nn.Linear(dim, self.codebook_size)  # p(x_0) never puts mass on the mask
        self.apply(init_gpt_weights)
        for module in self.modules():  # AdaLN starts as the plain norm (zero modulation)
            if isinstance(module, AdaptiveNorm):
                module.reset_parameters()

    # --- network ------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits of ``p(x_0 | x_t, y)`` ``(B, N, K)`` and the aux dict.

        ``x_t``: flat ``(B, N)`` tokens with ``mask_id`` for [MASK]; ``t``: ``(B,)`` steps in ``1..T``;
        ``labels``: ``(B,)`` classes, the null class where dropped; ``None`` = all null.
        """
        cond = self.time_emb(t) + self.classes(labels, x_t.shape[0])
        h, aux = self.transformer(self.embed(x_t), cond=cond)
        return self.head(h), aux

    # --- training -----------------------------------------------------------------------------
    def loss(self, codes: Tensor, labels: Tensor | None, context: Tensor | None = None,
             generator: torch.Generator | None = None) -> PriorLoss:
        """The bound (per token, estimated from one t per sample) plus λ times the x_0 cross-entropy.

        Training draws t from the step sampler (importance sampling when enabled) and records the
        bound terms; validation draws t uniformly (stratified), so ``nll`` (val/loss) always estimates the bound
        ``sum_{t>=1} L_{t-1}`` in nats per token (without the constant ``L_T``).
        """
        x0 = self.flatten_codes(codes)
        b, n = x0.shape
        if self.training:
            t, p_t = self.step_sampler.sample(b, x0.device, generator)
        else:
            t = stratified_steps(b, self.diffusion.steps, generator).to(x0.device)
            p_t = torch.full((b,), 1.0 / self.diffusion.steps, device=x0.device)
        x_t = self.diffusion.q_sample(x0, t, generator)
        logits, aux = self(x_t, t, labels)
        log_p = logits.float().log_softmax(-1)
        vlb = self.diffusion.vlb_terms(log_p, x0, x_t, t).sum(1)  # (B,)
        x0_nll = -log_p.gather(-1, x0.unsqueeze(-1)).squeeze(-1).sum(1)  # the auxiliary cross-entropy
        if self.training:
            self.step_sampler.update(t, vlb)
        weight = 2.0 - (t - 1).float() / self.diffusion.steps if self.adaptive_aux else torch.ones_like(p_t)
        loss = ((vlb + self.aux_weight * weight * x0_nll) / (p_t * n)).mean()
        stats = {
            "x0_nll": (x0_nll / n).mean().detach(),
            "x0_acc": (log_p.detach().argmax(-1) == x0).float().mean(),
        }
        return PriorLoss(loss, (vlb / (p_t * n)).mean().detach(), aux, stats)

    # --- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: int | Sequence[int] | Tensor | None = None,
        steps: int | None = None,
        cfg_scale: float = 0.0,
        truncation: float | None = None,
        purity: bool = False,
        purity_weight: float = 0.0,
        generator: torch.Generator | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Sample ``n`` code grids ``(n, *grid[, depth])``.

        ``steps``: reverse steps (default ``T``; fewer = skip-step posterior). ``cond``: None (the null
        class), one class, or ``n`` classes. ``cfg_scale``: discrete classifier-free guidance on
        ``log p(x_0)`` (0 = none, the null branch is not computed). ``truncation``: keep the top-r
        mass of ``p(x_0)`` (e.g. 0.86). ``purity``/``purity_weight``: Improved VQ-Diffusion's
        high-quality inference (see :func:`purity_decode`).
        """
        if context is not None:
            raise ValueError("VQDiffusionPrior takes no conditioning code grid")
        steps = self.diffusion.steps if steps is None else int(steps)
        if truncation is not None and not 0.0 < truncation <= 1.0:
            raise ValueError(f"truncation must be in (0, 1], got {truncation}")
        labels, guided = self.guidance_labels(n, cond, cfg_scale)

        def log_p_x0_fn(x_t: Tensor, t: Tensor) -> Tensor:
            if guided:
                log_p = self(x_t.repeat(2, 1), t.repeat(2), labels)[0].float().log_softmax(-1)
                log_p = guided_log_p_x0(log_p[:n], log_p[n:], cfg_scale)
            else:
                log_p = self(x_t, t, labels)[0].float().log_softmax(-1)
            return truncate(log_p, truncation)

        decode = functools.partial(purity_decode, purity_weight=purity_weight) if purity else diffusion_decode
        with self.evaluating():
            flat = decode(log_p_x0_fn, self.diffusion, n, self.seq_len, steps, generator=generator,
                          device=self.device)
        return self.unflatten_codes(flat)
