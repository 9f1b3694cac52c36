"""Gumbel-softmax quantization (DALL-E dVAE; taming-transformers' GumbelQuantize).

A 1x1 projection (a ``Linear`` on the rows, i.e. a 1x1 conv for any spatial rank) maps ``z`` with
``dim`` channels to ``K`` logits. Training samples ``gumbel_softmax(logits, tau)`` and mixes the
codebook with it; with ``hard=True`` the forward value is the sampled code and the estimator is
straight-through over the sample, ``z_q = (one_hot - sg(soft) + soft) E`` (``F.gumbel_softmax(hard=True)``
then a matmul, as in taming-transformers). So the codebook's gradient is ``one_hot^T g`` (the sampled
codes only) and ``g E^T`` flows through the soft sample into the logits. It is computed as
``E[idx] + (soft - sg(soft)) sg(E)`` (same value and gradients) so no one-hot is built.
The KL to a uniform prior, ``sum q log(q K)``, is weighted by ``kl_weight``. The temperature decays
exponentially as in DALL-E, ``tau = max(temperature * exp(-anneal_rate * step), temperature_min)``,
where ``step`` is a buffer counting training forwards (so it survives checkpoints). Inference takes
the argmax logit, in chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage1.quantizers._vq_ops import best_score, default_chunk_rows
from stage1.quantizers.base import Quantizer, QuantizerOutput, from_rows, to_rows, usage_stats


class GumbelQuantizer(Quantizer):
    """Gumbel-softmax quantizer: ``z (B, dim, *grid)`` -> logits over ``K`` codes -> code vectors."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        temperature: float = 1.0,
        temperature_min: float = 1.0 / 16,
        anneal_rate: float = 3e-5,
        hard: bool = True,
        kl_weight: float = 5e-4,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.temperature = temperature
        self.temperature_min = temperature_min
        self.anneal_rate = anneal_rate
        self.hard = hard
        self.kl_weight = kl_weight
        self.chunk_size = chunk_size or default_chunk_rows(codebook_size)
        self.proj = nn.Linear(dim, codebook_size)
        self.embed = nn.Parameter(torch.randn(codebook_size, dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def codebook(self) -> Tensor:
        return self.embed.detach().float()

    @property
    def current_temperature(self) -> float:
        decayed = self.temperature * math.exp(-self.anneal_rate * int(self.step))
        return max(decayed, self.temperature_min)

    def _argmax_codes(self, rows: Tensor) -> Tensor:
        weight, bias = self.proj.weight.detach().float(), self.proj.bias.detach().float()
        return best_score(rows.detach().float(), weight, bias=bias, chunk_rows=self.chunk_size)

    def forward(self, z: Tensor) -> QuantizerOutput:
        rows, grid = to_rows(z)
        stats: dict[str, Tensor] = {}
        if not self.training:
            with torch.autocast(z.device.type, enabled=False):
                idx = self._argmax_codes(rows)
                z_q = self.embed.float().index_select(0, idx)
                loss = z_q.new_zeros(())
        else:
            with torch.autocast(z.device.type, enabled=False):
                logits = self.proj(rows.float())
                tau = self.current_temperature
                soft = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)
                codes = self.embed.float()
                idx = soft.argmax(dim=1)
                if self.hard:
                    # The codebook enters the soft path detached: its gradient is one_hot^T g alone.
                    soft_q = soft @ codes.detach()
                    z_q = codes.index_select(0, idx) + (soft_q - soft_q.detach())
                else:
                    z_q = soft @ codes
                log_q = torch.log_softmax(logits, dim=1)
                kl = (log_q.exp() * (log_q + math.log(self.codebook_size))).sum(1).mean()
                loss = self.kl_weight * kl
                stats["kl_uniform"] = kl.detach()
                stats["temperature"] = torch.tensor(tau)
            self.step.add_(1)
        stats.update(usage_stats(idx, self.codebook_size))
        return QuantizerOutput(from_rows(z_q.to(z.dtype), grid), idx.view(grid), loss, stats)

    def encode(self, z: Tensor) -> Tensor:
        rows, grid = to_rows(z)
        with torch.autocast(z.device.type, enabled=False):
            return self._argmax_codes(rows).view(grid)

    def decode(self, codes: Tensor) -> Tensor:
        grid = tuple(codes.shape)
        return from_rows(self.embed.float().index_select(0, codes.reshape(-1).long()), grid)
