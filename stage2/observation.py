"""Priors over action-chunk codes conditioned on an observation history: the policy seam.

The prior base (:class:`stage2.prior.Prior`) conditions on class labels and on another *code*
grid (``context_level``); a policy conditions on *continuous* observations. This file adds that
seam without touching the base: :class:`ObservationPrior` is a :class:`~stage2.prior.Prior` that

* reads batches of :mod:`data.actions` (``{"obs": (B, h, O), "actions": (B, n, A)}``, normalised
  by the DataModule), encodes the chunks to codes with the frozen tokenizer (in the tokenizer's own
  normalised units, in case the two DataModules measured different statistics) and hands the
  observation history on as ``context`` to ``loss(codes, labels, context)``;
* keeps the DataModule's observation and action statistics as buffers (copied when training
  starts, saved in the checkpoint), so :meth:`act` / :meth:`policy` take raw observations and
  return actions in environment units;
* defines the policy a rollout calls: ``policy(obs_history (h, O) numpy) -> chunk (n, A) numpy``.

:class:`ObservationContext` is the minimal conditioning module for priors whose input is one
embedding per code token (the AR prior): the flattened history through a small MLP, added to every
token's input embedding, exactly where :class:`stage2.context.ContextGrid` adds a code grid's.
Subclasses implement ``sample(n, context=obs_normalised, **options)`` (codes) and may override
:meth:`predict_chunks` (VQ-BeT adds its offsets to the decoded chunk there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stage1.action_vq import Standardizer, statistics_of
from stage1.modalities.actions import env_dims
from stage2.prior import Prior


class ObservationContext(nn.Module):
    """Observation history ``(B, h, O)`` -> additive token embeddings ``(B, tokens, dim)`` (one vector,
    repeated at every token: the whole history is known before the first code is sampled)."""

    def __init__(self, obs_dim: int, history: int, dim: int, tokens: int, hidden: int | None = None) -> None:
        super().__init__()
        self.obs_dim, self.history, self.tokens = obs_dim, history, tokens
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(history * obs_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, obs: Tensor) -> Tensor:
        if tuple(obs.shape[1:]) != (self.history, self.obs_dim):
            raise ValueError(f"expected observation histories (B, {self.history}, {self.obs_dim}), "
                             f"got {tuple(obs.shape)}")
        return self.net(obs.float().flatten(1))[:, None].expand(-1, self.tokens, -1)


class ObservationPrior(Prior):
    """A prior over action-chunk codes given the observation history (see the module docstring)."""

    def __init__(self, history: int, obs_dim: int | None = None, env: str | None = None, **prior: Any) -> None:
        super().__init__(**prior)
        if obs_dim is None:
            if env is None:
                raise ValueError("give model.params.obs_dim, or env (e.g. ${data.params.env}) to read it from")
            obs_dim = env_dims(env)[0]
        layout = self.code_spec.get("layout") or {}
        if "chunk" not in layout or "action_dim" not in layout:
            raise ValueError("an observation prior models action-chunk codes: its tokenizer's code spec needs "
                             f"layout.chunk and layout.action_dim (an stage1.action_vq.ActionVQ), got {layout}")
        self.obs_dim, self.history = int(obs_dim), int(history)
        self.chunk, self.action_dim = int(layout["chunk"]), int(layout["action_dim"])
        self.observations = Standardizer(self.obs_dim)
        self.actions = Standardizer(self.action_dim)  # the statistics of this prior's training data

    # --- data -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage != "fit" or dm is None:
            return
        for key, standardizer in (("obs", self.observations), ("actions", self.actions)):
            stats = statistics_of(dm, key)
            if stats is not None:
                standardizer.set(*stats)

    def check_observations(self, n: int, context: Tensor | None) -> None:
        """Refuse ``sample`` without ``n`` observation histories: a policy's codes exist only for them."""
        if context is None or context.shape[0] != n:
            raise ValueError(f"{type(self).__name__} samples codes for observation histories: pass context=obs of "
                             "shape (n, h, O); to act, roll it out (scripts/sample.py CKPT -n 4, or "
                             "data.actions.rollout with model.as_policy())")

    def tokenizer_units(self, actions: Tensor) -> Tensor:
        """This prior's normalised actions -> the frozen tokenizer's normalised units."""
        return self.frozen_tokenizer.normalize_actions(self.actions.unnormalize(actions))

    def unpack_batch(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor | None, Any]:
        """``(codes (B, 1, depth), None, obs (B, h, O))`` of a :mod:`data.actions` batch."""
        obs = batch["obs"].float()
        if tuple(obs.shape[1:]) != (self.history, self.obs_dim):
            raise ValueError(f"batch['obs'] is {tuple(obs.shape)}, but this prior was built for histories "
                             f"(B, {self.history}, {self.obs_dim}): set model.params.history / obs_dim")
        codes = self.encode_batch(self.tokenizer_units(batch["actions"].float()))
        return codes, None, obs

    # --- acting -----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_chunks(self, obs: Tensor, generator: torch.Generator | None = None, **sampling: Any) -> Tensor:
        """Normalised observation histories ``(B, h, O)`` -> chunks in the tokenizer's normalised units:
        sampled codes decoded by the frozen tokenizer."""
        codes = self.sample(obs.shape[0], context=obs, generator=generator, **sampling)
        return self.frozen_tokenizer.decode(codes.to(self.device))

    @torch.no_grad()
    def act(self, obs_history: Tensor, generator: torch.Generator | None = None, **sampling: Any) -> Tensor:
        """Raw observation histories ``(B, h, O)`` -> action chunks ``(B, n, A)`` in environment units."""
        obs = self.observations.normalize(obs_history.to(self.device).float())
        with self.evaluating():
            chunks = self.predict_chunks(obs, generator=generator, **sampling)
        return self.frozen_tokenizer.unnormalize_actions(chunks)

    def policy(self, obs_history: np.ndarray, **sampling: Any) -> np.ndarray:
        """The rollout interface: one raw history ``(h, O)`` -> one chunk ``(n, A)`` (numpy, float32)."""
        obs = torch.as_tensor(np.asarray(obs_history, dtype=np.float32))[None]
        return self.act(obs, **sampling)[0].cpu().numpy().astype(np.float32)

    def as_policy(self, **sampling: Any) -> SeededPolicy:
        """A rollout policy with these sampling options whose draws restart from ``reset(seed)``."""
        return SeededPolicy(self, **sampling)

    def attach_tokenizer(self, tokenizer: Any) -> None:
        """Use an already loaded tokenizer (e.g. from :func:`tokenforge.runs.open_run`) instead of the
        recorded path."""
        self._frozen[:] = [tokenizer.eval().requires_grad_(False)]


class SeededPolicy:
    """``policy(obs_history) -> chunk`` of an :class:`ObservationPrior` with fixed sampling options and a
    generator that :func:`data.actions.rollout` re-seeds per episode (``reset(seed)``), so sampled
    rollouts repeat and different policy seeds from one start state show the modes the policy keeps."""

    def __init__(self, model: ObservationPrior, **sampling: Any) -> None:
        self.model, self.sampling = model, sampling
        self.generator = torch.Generator(device=model.device)

    def reset(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def __call__(self, obs_history: np.ndarray) -> np.ndarray:
        return self.model.policy(obs_history, generator=self.generator, **self.sampling)
