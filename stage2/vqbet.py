"""VQ-BeT (Lee et al. 2024, "Behavior Generation with Latent Actions"): a GPT over the observation
history that predicts the residual-VQ codes of the next action chunk and a continuous offset.

Network (checked against the authors' code, ``vq_behavior_transformer/bet.py``):

* a causal transformer (:class:`layers.transformer.Transformer`) over the ``h`` observations (one
  token each, a linear embedding); the last position's output ``f`` summarises the history;
* code heads: the primary head ``MLP(f) -> logits over the first level's K codes``; the head of
  level ``l > 0`` sees ``[f, one_hot(c_0), ..., one_hot(c_{l-1})]`` (the official
  ``sequentially_select`` mode: the secondary code is conditioned on the primary; teacher-forced
  with the true codes in training, the sampled ones when acting). ``condition_secondary: false``
  gives the official independent heads instead;
* offset head: ``MLP(f) -> (depth, K, n, A)``, one offset chunk per level and code; the offset of a
  prediction is the sum over levels of the offsets at the chosen codes, added to the frozen
  tokenizer's decoded chunk (``decoded + offset`` is the predicted action chunk).

Loss (official weights as defaults): ``primary_weight * FL(c_0) + secondary_weight * sum_{l>0}
FL(c_l) + offset_weight * L1(a, decoded(ĉ) + offset(ĉ))`` with the focal loss ``FL = -(1-p)^γ log p``
(γ = 2) averaged over the batch, and ``ĉ`` the codes *sampled* from the predicted distributions, as
the official code does (``offset_codes: target`` indexes the offsets at the true codes instead: where
the observations do not decide the mode, offsets at sampled codes learn to pull every code toward the
median action and can flip a sampled mode; see ``bench/results/vqbet_offsets.md``, where this flipped
59% of MountainCar's start-state chunks; ``configs/vqbet.yaml`` ships ``target``).
Official weights: 5 and 0.5 for the codes; the offset multiplier is 100 on unit-scale (kitchen)
actions, which is ours since :mod:`data.actions` normalises actions. ``val/loss`` is the exact NLL
of the true codes per code token (``-log p(c_0) - log p(c_1 | c_0)`` over depth).

Differences from the official code, on purpose: one AdamW over all parameters (the official
steps the offset head with a second optimiser of the same settings), and a loss on the last
history position only (our DataModule yields one chunk per history window; the official code
scores every position of the window).

The tokenizer is a frozen :class:`stage1.action_vq.ActionVQ` named by ``tokenizer: CKPT`` and loaded
weights-only by the prior base; batches, statistics and the rollout policy come from
:class:`stage2.observation.ObservationPrior`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage2.observation import ObservationPrior
from stage2.options import TEMPERATURE
from stage2.prior import PriorLoss
from stage2.sampling import sample_from_logits
from stage2.transformer_prior import TransformerPrior, init_gpt_weights


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017) as VQ-BeT uses it: mean over rows of ``-(1 - p_t)^γ log p_t``,
    ``p_t`` the softmax probability of the target class; ``γ = 0`` is cross-entropy."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, target.long()[..., None])[..., 0]
    return (-(1.0 - logp.exp()).pow(gamma) * logp).mean()


def head(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    """An MLP head: ``layers`` hidden ReLU layers of width ``hidden`` then a linear output."""
    mods: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*mods, nn.Linear(width, out_dim))


class VQBeT(TransformerPrior, ObservationPrior):
    """VQ-BeT policy over a frozen action tokenizer's residual codes (see the module docstring)."""

    sampling_options = (TEMPERATURE,)  # temperature 0 = argmax codes

    def __init__(
        self,
        history: int,
        obs_dim: int | None = None,
        env: str | None = None,
        head_hidden: int = 256,
        head_layers: int = 2,
        gamma: float = 2.0,
        primary_weight: float = 5.0,
        secondary_weight: float = 0.5,
        offset_weight: float = 100.0,
        condition_secondary: bool = True,
        offset_codes: str = "sampled",
        positions: str = "learned",
        **prior: Any,
    ) -> None:
        super().__init__(history=history, obs_dim=obs_dim, env=env, positions=positions, **prior)
        if offset_codes not in ("sampled", "target"):
            raise ValueError(f"offset_codes must be 'sampled' (official) or 'target' (the true codes), "
                             f"got {offset_codes!r}")
        self.levels = self.code_depth or 1
        k, dim = self.codebook_size, self.dim
        self.obs_in = nn.Linear(self.obs_dim, dim)
        self.transformer = self.build_transformer(causal=True, max_len=self.history)
        self.code_heads = nn.ModuleList(
            head(dim + (level * k if condition_secondary else 0), head_hidden, k, head_layers if level == 0 else 1)
            for level in range(self.levels))
        self.offset_head = head(dim, head_hidden, self.levels * k * self.chunk * self.action_dim, head_layers)
        self.apply(init_gpt_weights)

    # --- network --------------------------------------------------------------------------------
    def features(self, obs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Normalised histories ``(B, h, O)`` -> the last position's output ``(B, dim)`` and the aux dict."""
        if tuple(obs.shape[1:]) != (self.history, self.obs_dim):
            raise ValueError(f"expected observation histories (B, {self.history}, {self.obs_dim}), "
                             f"got {tuple(obs.shape)}")
        h, aux = self.transformer(self.obs_in(obs.float()))
        return h[:, -1], aux

    def code_logits(self, f: Tensor, level: int, previous: Tensor) -> Tensor:
        """Logits ``(B, K)`` of level ``level`` given the features and the codes ``(B, level)`` before it."""
        if self.hparams.condition_secondary and level > 0:
            f = torch.cat([f, F.one_hot(previous[:, :level].long(), self.codebook_size).flatten(1).to(f)], dim=1)
        return self.code_heads[level](f)

    def offsets(self, f: Tensor, codes: Tensor) -> Tensor:
        """The offset chunk ``(B, n, A)``: the sum over levels of the offsets at ``codes`` ``(B, depth)``."""
        table = self.offset_head(f).view(-1, self.levels, self.codebook_size, self.chunk, self.action_dim)
        rows = torch.arange(f.shape[0], device=f.device)[:, None]
        levels = torch.arange(self.levels, device=f.device)[None]
        return table[rows, levels, codes.long()].sum(dim=1)

    def draw_codes(self, f: Tensor, temperature: float, generator: torch.Generator | None = None) -> Tensor:
        """Codes ``(B, depth)`` level by level, each conditioned on those drawn before it."""
        codes = torch.zeros(f.shape[0], self.levels, dtype=torch.long, device=f.device)
        for level in range(self.levels):
            logits = self.code_logits(f, level, codes)
            codes[:, level] = sample_from_logits(logits.float(), temperature, generator)
        return codes

    def _as_spec(self, codes: Tensor) -> Tensor:
        """``(B, depth)`` -> the tokenizer's code shape ``(B, 1[, depth])``."""
        return codes[:, None] if self.code_depth else codes

    def _decode(self, codes: Tensor) -> Tensor:
        return self.frozen_tokenizer.decode(self._as_spec(codes)).detach()

    # --- training -------------------------------------------------------------------------------
    def unpack_batch(self, batch: Any) -> tuple[Tensor, Tensor | None, Any]:
        """Codes, no labels, and ``{"obs", "actions"}`` as context: the offset loss needs the true chunk."""
        codes, _, obs = super().unpack_batch(batch)
        return codes, None, {"obs": obs, "actions": self.tokenizer_units(batch["actions"].float())}

    def loss(self, codes: Tensor, labels: Tensor | None, context: Any = None,
             generator: torch.Generator | None = None) -> PriorLoss:
        hp = self.hparams
        target = codes.reshape(codes.shape[0], self.levels).long()
        actions = context["actions"]
        f, aux = self.features(context["obs"])
        focal, nll, correct = [], [], []
        for level in range(self.levels):
            logits = self.code_logits(f, level, target).float()  # teacher-forced on the true codes
            focal.append(focal_loss(logits, target[:, level], hp.gamma))
            nll.append(F.cross_entropy(logits, target[:, level]))
            correct.append((logits.argmax(-1) == target[:, level]).float().mean())
        code_loss = hp.primary_weight * focal[0] + hp.secondary_weight * sum(focal[1:], f.new_zeros(()))
        with torch.no_grad():
            chosen = target if hp.offset_codes == "target" else self.draw_codes(f, 1.0, generator)
        decoded = self._decode(chosen)
        predicted = decoded + self.offsets(f, chosen)
        offset_loss = F.l1_loss(predicted, actions)
        stats = {"code_loss": code_loss.detach(), "offset_loss": offset_loss.detach(),
                 "action_mse": F.mse_loss(predicted, actions).detach(),
                 "decoded_mse": F.mse_loss(decoded, actions).detach()}
        stats |= {f"focal_level{i}": v.detach() for i, v in enumerate(focal)}
        stats |= {f"code_accuracy_level{i}": v for i, v in enumerate(correct)}
        return PriorLoss(code_loss + hp.offset_weight * offset_loss, torch.stack(nll).mean(), aux, stats)

    # --- sampling and acting --------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, cond: int | Sequence[int] | Tensor | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None, context: Tensor | None = None) -> Tensor:
        """Codes ``(n, 1, depth)`` for ``n`` normalised observation histories ``context`` ``(n, h, O)``."""
        self.check_observations(n, context)
        with self.evaluating():
            f, _ = self.features(context.to(self.device))
            return self._as_spec(self.draw_codes(f, temperature, generator))

    @torch.no_grad()
    def predict_chunks(self, obs: Tensor, generator: torch.Generator | None = None, temperature: float = 1.0,
                       use_offset: bool = True) -> Tensor:
        """Normalised histories -> ``decoded(codes) + offset(codes)`` (tokenizer units), codes drawn at
        ``temperature`` (0: argmax of each level given the chosen codes before it)."""
        f, _ = self.features(obs.to(self.device))
        codes = self.draw_codes(f, temperature, generator)
        decoded = self._decode(codes)
        return decoded + self.offsets(f, codes) if use_offset else decoded
