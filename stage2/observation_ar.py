"""The plain AR-over-codes policy: our :class:`stage2.ar.ARPrior`, conditioned on the observation history.

A chunk's codes ``(1, depth)`` flatten to ``depth`` tokens (primary, secondary, ...), which the AR
transformer predicts in order: the secondary code is conditioned on the primary by the causal
attention itself, with no head of its own. The observation history enters through
:class:`stage2.observation.ObservationContext`, added to every token's input embedding through the
same ``context`` path that VQ-VAE-2's bottom prior uses for its top codes (``stage2.context``).
There is no offset: the action chunk is the frozen tokenizer's decoding of the sampled codes, so
this is VQ-BeT without its offset head and focal loss, trained with the exact NLL of the codes.
Sampling options are the AR prior's (temperature, top-k, top-p; temperature 0 is argmax).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from stage2.ar import ARPrior
from stage2.observation import ObservationContext, ObservationPrior
from stage2.transformer_prior import init_gpt_weights


class ObservationARPrior(ARPrior, ObservationPrior):
    """:class:`ARPrior` over action-chunk codes with an observation-history context (module docstring)."""

    def __init__(self, history: int, obs_dim: int | None = None, env: str | None = None,
                 context_hidden: int | None = None, **prior: Any) -> None:
        super().__init__(history=history, obs_dim=obs_dim, env=env, **prior)
        if self.context_level is not None:
            raise ValueError("an observation-conditioned AR prior takes its context from the observations; "
                             "drop context_level")
        self.context = ObservationContext(self.obs_dim, self.history, self.dim, self.seq_len, context_hidden)
        self.context.apply(init_gpt_weights)

    def sample(self, n: int, *args: Any, context: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Codes ``(n, 1, depth)`` for ``n`` normalised observation histories ``context`` ``(n, h, O)``."""
        self.check_observations(n, context)
        return super().sample(n, *args, context=context, **kwargs)
