"""The mask-and-replace discrete diffusion of VQ-Diffusion (Gu et al. 2022), kept apart from any network.

States are the ``K`` code values plus one absorbing ``[MASK]`` state (index ``K``). One forward step
``t`` keeps a token with probability ``alpha_t + beta_t``, replaces it by each of the ``K`` values
with ``beta_t``, or masks it with ``gamma_t``; a masked token stays masked. Products of such
matrices stay in the family, so the step from ``s`` to ``t > s`` has the closed form

    alpha_{s->t} = abar_t / abar_s,   1 - gamma_{s->t} = (1 - gbar_t) / (1 - gbar_s),
    beta_{s->t}  = (1 - alpha_{s->t} - gamma_{s->t}) / K,

with the cumulative ``abar``, ``gbar`` (index 0 is the identity: ``abar_0 = 1``, ``gbar_0 = 0``).
``q(x_t | x_0)`` is the case ``s = 0``, the single step the case ``s = t - 1``, and the skip-step
posterior used for fast sampling the case of any ``s < t``: everything below is written once for a
general ``(s, t)`` and never builds a ``(K+1) x (K+1)`` matrix, only ``O(K)`` work per token.

Timesteps are 1-based: ``t`` in ``1..T``; ``x_0`` is the data. The official code (and diffusers'
``VQDiffusionScheduler``) index the same schedule 0-based (their ``t`` is our ``t - 1``).

Every distribution is in log space with the classes on the LAST axis (``(..., K+1)`` over all
states, ``(..., K)`` for ``p(x_0)`` which never puts mass on the mask). Zero probabilities are
floored at ``LOG_ZERO`` (~1e-30) rather than ``-inf``, so KL terms and gradients stay finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage2.sampling import filter_logits

LOG_ZERO = math.log(1e-30)


def _log(x: Tensor) -> Tensor:
    return torch.log(x.clamp_min(1e-30))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012), floored at LOG_ZERO."""
    x = x.clamp(max=0.0)
    out = torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return out.clamp_min(LOG_ZERO)


def linear_cumulative_schedule(
    steps: int,
    alpha_start: float = 0.99999,
    alpha_end: float = 0.000009,
    gamma_start: float = 0.000009,
    gamma_end: float = 0.99999,
) -> tuple[Tensor, Tensor]:
    """The paper's schedule: ``abar_t`` and ``gbar_t`` linear in ``t`` from their start (t=1) to end (t=T).

    Returns float64 tensors of length ``T + 1`` with the identity at index 0 (``abar_0 = 1``,
    ``gbar_0 = 0``). ``gbar_T = 0.99999``: at ``t = T`` practically all mass is on the mask.
    """
    if steps < 2:
        raise ValueError(f"a diffusion needs at least 2 steps, got {steps}")
    frac = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    abar = alpha_start + frac * (alpha_end - alpha_start)
    gbar = gamma_start + frac * (gamma_end - gamma_start)
    one = torch.ones(1, dtype=torch.float64)
    return torch.cat([one, abar]), torch.cat([0 * one, gbar])


class DiscreteDiffusion(nn.Module):
    """Schedule, forward process, posterior and variational-bound terms of mask-and-replace diffusion.

    Holds only derived buffers (not saved in checkpoints: they are rebuilt from the arguments), so
    it moves with the prior's device. ``num_codes`` is ``K``; the mask index is ``K``.
    """

    def __init__(
        self,
        num_codes: int,
        steps: int = 100,
        alpha_start: float = 0.99999,
        alpha_end: float = 0.000009,
        gamma_start: float = 0.000009,
        gamma_end: float = 0.99999,
    ):
        super().__init__()
        self.num_codes = int(num_codes)
        self.steps = int(steps)
        self.mask_id = self.num_codes
        abar, gbar = linear_cumulative_schedule(steps, alpha_start, alpha_end, gamma_start, gamma_end)
        if not (abar[1:] <= abar[:-1]).all() or not (gbar[1:] >= gbar[:-1]).all():
            raise ValueError("abar must not increase and gbar must not decrease over the steps")
        one_step_beta = ((1 - gbar[1:]) / (1 - gbar[:-1]) - abar[1:] / abar[:-1]) / self.num_codes
        if (one_step_beta < -1e-12).any() or (abar + gbar > 1 + 1e-12).any():
            raise ValueError("this schedule gives negative replacement probabilities beta_t; "
                             "abar must fall at least as fast (relatively) as 1 - gbar")
        # float64 so that the closed forms are exact in tests; cast to the data's dtype when used
        self.register_buffer("abar", abar, persistent=False)
        self.register_buffer("gbar", gbar, persistent=False)

    # --- transition coefficients ------------------------------------------------------------------
    def coefficients(self, s: Tensor | int, t: Tensor | int) -> tuple[Tensor, Tensor, Tensor]:
        """``(alpha, beta, gamma)`` of the transition ``x_s -> x_t`` (``0 <= s <= t <= T``), float64."""
        s = torch.as_tensor(s, device=self.abar.device)
        t = torch.as_tensor(t, device=self.abar.device)
        if (s < 0).any() or (t > self.steps).any() or (s > t).any():
            raise ValueError(f"need 0 <= s <= t <= {self.steps}, got s={s.tolist()}, t={t.tolist()}")
        alpha = self.abar[t] / self.abar[s]
        keep = (1 - self.gbar[t]) / (1 - self.gbar[s])  # 1 - gamma: not masked on the way
        beta = ((keep - alpha) / self.num_codes).clamp_min(0.0)
        return alpha, beta, 1 - keep

    def _log_coefficients(self, s: Tensor | int, t: Tensor | int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Log coefficients shaped to broadcast against ``like`` (batch first, one value per row)."""
        shape = (-1,) + (1,) * (like.dim() - 1)
        return tuple(_log(c).to(like.dtype).reshape(shape) for c in self.coefficients(s, t))

    # --- forward process ------------------------------------------------------------------------
    def transition(self, log_x: Tensor, s: Tensor | int, t: Tensor | int) -> Tensor:
        """Log-distribution of ``x_t`` given ``x_s ~ exp(log_x)`` over all ``K + 1`` states.

        ``log_x`` is ``(B, ..., K+1)``; ``s``, ``t`` are ints or ``(B,)``. With ``s = 0`` this is
        ``q(x_t | x_0)``, with ``s = t - 1`` one forward step.
        """
        log_a, log_b, log_c = self._log_coefficients(s, t, log_x)
        log_codes, log_mask = log_x[..., :-1], log_x[..., -1:]
        log_not_mask = _log1mexp(log_mask)
        kept_or_replaced = torch.logaddexp(log_codes + log_a, log_not_mask + log_b)
        masked = torch.logaddexp(log_not_mask + log_c, log_mask)
        return torch.cat([kept_or_replaced, masked], dim=-1)

    def q_sample(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x_t ~ q(x_t | x_0)`` for code indices ``x0`` ``(B, ...)`` and steps ``t`` ``(B,)``.

        One uniform per token decides mask (``gbar_t``), uniform replacement (``K * bbar_t``, which
        may redraw the same value) or keep; no distribution over the vocabulary is materialised.
        """
        alpha, beta, gamma = self.coefficients(0, t)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        gamma = gamma.to(torch.float32).reshape(shape)
        replace = (beta * self.num_codes).to(torch.float32).reshape(shape)
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        random_codes = torch.randint(0, self.num_codes, x0.shape, generator=generator, device=x0.device)
        xt = torch.where(u < gamma + replace, random_codes, x0)
        return torch.where(u < gamma, torch.full_like(x0, self.mask_id), xt)

    # --- posterior and reverse step -----------------------------------------------------------
    def posterior(self, log_p_x0: Tensor, x_t: Tensor, t: Tensor | int, s: Tensor | int | None = None) -> Tensor:
        """``log p(x_s | x_t) = log sum_{x_0} q(x_s | x_t, x_0) p(x_0 | x_t)`` over the ``K + 1`` states.

        ``log_p_x0`` ``(B, ..., K)`` is a log-distribution over the real codes (a one-hot gives the
        true posterior ``q(x_s | x_t, x_0)``); ``x_t`` ``(B, ...)`` holds indices (mask = ``K``);
        ``s`` defaults to ``t - 1`` (``s < t`` skips steps). By Bayes' rule
        ``q(x_s | x_t, x_0) = q(x_t | x_s) q(x_s | x_0) / q(x_t | x_0)``, so with
        ``w(x_0) = p(x_0) / q(x_t | x_0)`` the sum is ``q(x_t | x_s) * sum_{x_0} q(x_s | x_0) w(x_0)``,
        which the structure of ``Q`` gives in ``O(K)`` per token. The result sums to 1 exactly.
        """
        t = torch.as_tensor(t, device=x_t.device)
        s = t - 1 if s is None else torch.as_tensor(s, device=x_t.device)
        b = x_t.shape[0]
        t, s = t.expand(b) if t.dim() == 0 else t, s.expand(b) if s.dim() == 0 else s
        if (s >= t).any():
            raise ValueError("the posterior needs s < t")
        log_p_x0 = log_p_x0.log_softmax(-1)  # a no-op on a normalised input; makes truncation safe
        is_mask = (x_t == self.mask_id).unsqueeze(-1)
        codes_t = x_t.clamp(max=self.num_codes - 1).unsqueeze(-1)
        same = F.one_hot(codes_t.squeeze(-1), self.num_codes).bool()  # x_0 (or x_s) equals x_t

        # log q(x_t | x_0) as a function of x_0 (the observed x_t is fixed)
        a0, b0, c0 = self._log_coefficients(0, t, log_p_x0)
        q_t_given_0 = torch.where(is_mask, c0, torch.where(same, torch.logaddexp(a0, b0), b0))
        log_w = log_p_x0 - q_t_given_0
        log_norm = log_w.logsumexp(-1, keepdim=True)
        log_w = log_w - log_norm

        # sum_{x_0} q(x_s | x_0) w(x_0): a forward transition 0 -> s of the normalised weights
        log_w_all = torch.cat([log_w, torch.full_like(log_w[..., :1], LOG_ZERO)], dim=-1)
        marginal_s = self.transition(log_w_all, 0, s)

        # log q(x_t | x_s) as a function of x_s over all K + 1 states
        a_st, b_st, c_st = self._log_coefficients(s, t, log_p_x0)
        to_code = torch.where(same, torch.logaddexp(a_st, b_st), b_st)
        to_code = torch.cat([to_code, torch.full_like(to_code[..., :1], LOG_ZERO)], dim=-1)
        to_mask = torch.cat([c_st.expand_as(log_p_x0), torch.zeros_like(log_p_x0[..., :1])], dim=-1)
        q_t_given_s = torch.where(is_mask, to_mask, to_code)
        return (marginal_s + q_t_given_s + log_norm).clamp_min(LOG_ZERO)

    def sample_categorical(self, log_probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One index per row of ``log_probs`` ``(..., V)`` (Gumbel-max, as in the official sampler)."""
        u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device, dtype=torch.float32)
        gumbel = -torch.log((-torch.log(u.clamp_min(1e-30))).clamp_min(1e-30))
        return (log_probs.float() + gumbel).argmax(-1)

    # --- variational bound --------------------------------------------------------------------
    def log_onehot(self, x: Tensor, num_states: int | None = None) -> Tensor:
        """Log of a one-hot over ``num_states`` (default ``K``), floored at ``LOG_ZERO``."""
        onehot = F.one_hot(x, num_states or self.num_codes)
        return torch.where(onehot.bool(), 0.0, LOG_ZERO)

    def vlb_terms(self, log_p_x0: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-token terms of the variational bound at step ``t`` (``(B,)``, 1-based), shape ``x0.shape``.

        ``t >= 2``: ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))``; ``t = 1``: the decoder term
        ``-log p(x_0 | x_1)`` with ``p(x_0 | x_1)`` the model's reverse step to ``s = 0``.
        """
        log_model = self.posterior(log_p_x0, x_t, t)
        log_true = self.posterior(self.log_onehot(x0).to(log_p_x0.dtype), x_t, t)
        kl = (log_true.exp() * (log_true - log_model)).sum(-1)
        decoder_nll = -log_model.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        first = (t == 1).reshape((-1,) + (1,) * (x0.dim() - 1))
        return torch.where(first, decoder_nll, kl)


def truncate(log_p: Tensor, rate: float | None) -> Tensor:
    """Improved VQ-Diffusion's truncation: keep the most likely codes up to ``rate`` of the mass.

    The same nucleus rule as top-p (the code that crosses ``rate`` is kept, and always the top one),
    then renormalised. ``None`` or ``1.0`` leaves ``log_p`` unchanged.
    """
    if rate is None or rate >= 1.0:
        return log_p
    return filter_logits(log_p, top_p=rate).clamp_min(LOG_ZERO).log_softmax(-1)


def guided_log_p_x0(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Discrete classifier-free guidance on log-probabilities of ``x_0``, renormalised.

    ``cond + scale * (cond - uncond)`` (the package's convention: ``scale = 0`` is unguided and
    returns ``cond`` unchanged; the official code's ``s`` is ours plus one).
    """
    if scale == 0:
        return cond
    return (cond + scale * (cond - uncond)).log_softmax(-1)


def stratified_steps(n: int, steps: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` steps in ``1..steps``, evenly spaced from one random offset then shuffled (on the generator's device).

    The low-discrepancy sampler of Kingma et al. (2021): each draw is uniform over the steps, but a
    batch covers the whole chain, so a batch's bound estimate varies far less than with iid draws.
    """
    gdev = generator.device if generator is not None else torch.device("cpu")
    offset = torch.rand((), generator=generator, device=gdev, dtype=torch.float64)
    u = (torch.arange(n, device=gdev, dtype=torch.float64) + offset) / n
    idx = (u * steps).long().clamp(max=steps - 1)
    return idx[torch.randperm(n, generator=generator, device=gdev)] + 1


class ImportanceStepSampler(nn.Module):
    """Draws ``t`` uniformly, or ``p(t) ∝ sqrt(E[L_t^2])`` once each step was seen ``min_count`` times.

    Importance sampling as in the official code (after Nichol & Dhariwal 2021): a running mean of
    ``L_t^2`` per step (decay 0.9), with the ``t = 1`` weight copied from ``t = 2``; the loss is
    divided by ``p(t)`` so that its expectation is still the full bound. The history is saved in
    checkpoints. Uniform draws are stratified over the batch (:func:`stratified_steps`).
    """

    def __init__(self, steps: int, importance: bool = False, min_count: int = 10):
        super().__init__()
        self.steps, self.importance, self.min_count = int(steps), bool(importance), int(min_count)
        self.register_buffer("loss_sq", torch.zeros(self.steps, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(self.steps, dtype=torch.long))

    def probabilities(self) -> Tensor:
        uniform = torch.full((self.steps,), 1.0 / self.steps, dtype=torch.float64, device=self.loss_sq.device)
        if not self.importance or (self.count < self.min_count).any():
            return uniform
        weight = self.loss_sq.sqrt() + 1e-4
        weight[0] = weight[1]
        return weight / weight.sum()

    def sample(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(t, p_t)``: ``n`` 1-based steps and their probabilities (float32)."""
        probs = self.probabilities()
        if not self.importance or (self.count < self.min_count).any():
            return stratified_steps(n, self.steps, generator).to(device), probs.to(device, torch.float32)[:1].expand(n)
        idx = torch.multinomial(probs.float().cpu(), n, replacement=True, generator=generator).to(device)
        return idx + 1, probs.to(device)[idx].float()

    @torch.no_grad()
    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample bound terms ``losses`` ``(B,)`` at steps ``t`` ``(B,)``."""
        idx = (t - 1).long()
        sq = losses.detach().double().pow(2)
        for i, value in zip(idx.tolist(), sq.tolist()):  # B small updates; order matters for the EMA
            self.loss_sq[i] = 0.9 * self.loss_sq[i] + 0.1 * value
            self.count[i] += 1
