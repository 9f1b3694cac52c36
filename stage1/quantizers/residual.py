"""Residual quantization (RQ-VAE, Lee et al. 2022; SoundStream, Zeghidour et al. 2021).

Level ``l`` quantizes what the previous levels left over, ``r_l = z - sg(sum_{j<l} q_j)``, and the
quantized latent is ``sum_l q_l``; codes are ``(B, *grid, depth)``. Each level is any
single-level quantizer built from a ``{target, params}`` spec (its ``dim`` is set to this
quantizer's ``dim``), either one module shared by every level (RQ-VAE's shared codebook) or one
per level (SoundStream/EnCodec).

Gradients (RQ-VAE, EnCodec): **one** straight-through estimator on the sum,
``z_q = z + sg(sum_l q_l - z)``, so ``dL/dz`` from the reconstruction is exactly ``dL/dz_q`` whatever
the depth (per-level estimators would hand the encoder ``depth x`` that). Each level's own loss
(its commitment ``||r_l - sg(q_l)||^2``, codebook and entropy terms) is computed on its own residual
and reaches the encoder through it. Implementation: level outputs are summed as they are (so
parameters that a level trains through its output - projections, IBQ/Gumbel codebooks - keep their
gradients) and every level after the first subtracts ``r_l - sg(r_l)`` (value 0, gradient the
identity), which removes the extra identity paths to the encoder; for straight-through levels (VQ
and its variants) the result equals ``z + sg(sum q - z)`` in value and in ``dL/dz``. ``level_loss``
sums the levels' losses (``"sum"``, SoundStream/EnCodec) or averages them (``"mean"``, RQ-VAE).

Shared EMA codebook: the shared module is wrapped in its ``pooled_updates()`` block for the step, so
every level looks codes up in the same codebook and the EMA (and running usage, dead-code restart)
is updated **once** per training step with the counts and sums pooled over the levels.

Quantizer dropout (SoundStream): in training, with probability ``dropout_prob`` a batch uses only
the first ``n ~ U{1..depth}`` levels, so one model serves every bitrate. Codes of levels that a
batch did not use are ``-1``; :meth:`ResidualQuantizer.decode` skips ``-1`` entries, and
``decode(codes, levels=d)`` is the partial sum of the first ``d`` levels (the bitrate-``d`` decode).
Under DDP unused levels leave parameters without gradients, so use ``find_unused_parameters=True``
(Lightning: ``strategy=ddp_find_unused_parameters_true``) together with dropout.

Stats: ``usage_level{l}`` / ``perplexity_level{l}`` (and every other sub-quantizer stat) per level,
``usage`` / ``perplexity`` as their mean, and with a shared codebook ``usage_codebook`` /
``perplexity_codebook`` over the codes of all active levels pooled (how much of the one codebook
the stack uses).

``level_scale`` (default 1) multiplies level ``l``'s input by ``level_scale**l`` and divides its
output by the same factor; this is how residual FSQ/LFQ (fixed-range quantizers) keep resolving
ever smaller residuals. Learned-codebook VQ does not need it.

Configuring RQ-VAE (Lee et al. 2022): one shared EMA VQ codebook, losses averaged over depth,
optionally quantizer dropout for several bitrates::

    quantizer:
      target: stage1.quantizers.residual.ResidualQuantizer
      params:
        depth: 4
        shared_codebook: true        # one codebook tensor for every level
        level_loss: mean             # RQ-VAE averages the per-depth commitment losses
        dropout_prob: 0.0            # > 0: SoundStream quantizer dropout (one model, several bitrates)
        quantizer:
          target: stage1.quantizers.vq.VectorQuantizer
          params: {codebook_size: 16384, codebook: ema, decay: 0.99, beta: 0.25,
                   kmeans_init: false, restart_dead: false}   # both available with a shared codebook
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from layers.instantiate import instantiate
from stage1.quantizers.base import Quantizer, QuantizerOutput, usage_stats


def build_sub_quantizer(spec: Mapping[str, Any], dim: int, where: str) -> Quantizer:
    """Instantiate a single-level quantizer of width ``dim`` from a ``{target, params}`` spec."""
    params = dict(spec.get("params") or {}) if isinstance(spec, Mapping) else {}
    if "dim" in params and int(params["dim"]) != dim:
        raise ValueError(f"{where}: params.dim={params['dim']} but this quantizer sets it to {dim}; drop it")
    params.pop("dim", None)
    quantizer = instantiate({**spec, "params": params}, where=where, base=Quantizer, dim=dim)
    if not isinstance(quantizer, Quantizer):
        raise TypeError(f"{where}: {spec.get('target')!r} is not a Quantizer")
    if quantizer.depth is not None:
        raise ValueError(f"{where}: nested quantizers must be single-level (depth None), got depth={quantizer.depth}")
    return quantizer


def suffixed_stats(stats: Mapping[str, Tensor], codes: Tensor, codebook_size: int, suffix: str) -> dict[str, Tensor]:
    """A sub-quantizer's stats (usage/perplexity recomputed from its codes) with ``suffix`` appended."""
    merged = {k: v for k, v in stats.items() if k not in ("usage", "perplexity")}
    merged.update(usage_stats(codes, codebook_size))
    return {f"{k}{suffix}": v.detach() for k, v in merged.items()}


class ResidualQuantizer(Quantizer):
    """``depth`` levels of residual quantization; codes ``(B, *grid, depth)``, ``codebook_size`` per level."""

    def __init__(
        self,
        dim: int,
        depth: int,
        quantizer: Mapping[str, Any],
        shared_codebook: bool = False,
        dropout_prob: float = 0.0,
        level_scale: float = 1.0,
        level_loss: str = "sum",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if not 0.0 <= dropout_prob <= 1.0:
            raise ValueError(f"dropout_prob must lie in [0, 1], got {dropout_prob}")
        if level_loss not in ("sum", "mean"):
            raise ValueError(f"level_loss must be 'sum' or 'mean', got {level_loss!r}")
        self.dim = int(dim)
        self.depth = int(depth)
        self.shared_codebook = bool(shared_codebook)
        self.dropout_prob = float(dropout_prob)
        self.level_scale = float(level_scale)
        self.level_loss = level_loss
        n_modules = 1 if self.shared_codebook else self.depth
        self.quantizers = nn.ModuleList(
            build_sub_quantizer(quantizer, self.dim, where=f"residual.quantizer[{i}]") for i in range(n_modules)
        )
        self.codebook_size = int(self.quantizers[0].codebook_size)

    def level(self, index: int) -> Quantizer:
        """The quantizer used at level ``index`` (the same module at every level when shared)."""
        return self.quantizers[0 if self.shared_codebook else index]

    def _scale(self, index: int) -> float:
        return self.level_scale**index

    def _active_levels(self) -> int:
        if self.training and self.dropout_prob > 0 and torch.rand(()).item() < self.dropout_prob:
            return int(torch.randint(1, self.depth + 1, ()).item())
        return self.depth

    def _step_context(self):
        """A shared codebook with step-wise statistics (EMA, usage, restarts) updates once per step."""
        shared = self.quantizers[0]
        if self.shared_codebook and self.training and hasattr(shared, "pooled_updates"):
            return shared.pooled_updates()
        return nullcontext()

    def forward(self, z: Tensor) -> QuantizerOutput:
        n_active = self._active_levels()
        residual = z.float()
        z_q = torch.zeros_like(residual)
        extra_paths = torch.zeros_like(residual)  # sum over levels >= 1 of (r_l - sg(r_l)): value 0
        loss = z.new_zeros((), dtype=torch.float32)
        codes, stats = [], {}
        with self._step_context():
            for i in range(n_active):
                scale = self._scale(i)
                out = self.level(i)(residual * scale if scale != 1.0 else residual)
                q = out.z_q.float() / scale if scale != 1.0 else out.z_q.float()
                z_q = z_q + q
                if i > 0:
                    extra_paths = extra_paths + (residual - residual.detach())
                residual = residual - q.detach()
                loss = loss + out.loss.float()
                codes.append(out.codes)
                stats.update(suffixed_stats(out.stats, out.codes, self.codebook_size, f"_level{i}"))
        # One straight-through estimator for the sum: drop the identity path each later level adds.
        z_q = z_q - extra_paths
        if self.level_loss == "mean":
            loss = loss / n_active
        if self.shared_codebook:
            stats.update({f"{k}_codebook": v for k, v in usage_stats(torch.stack(codes), self.codebook_size).items()})
        unused = torch.full_like(codes[0], -1)
        codes.extend(unused for _ in range(self.depth - n_active))
        stats["usage"] = torch.stack([stats[f"usage_level{i}"] for i in range(n_active)]).mean()
        stats["perplexity"] = torch.stack([stats[f"perplexity_level{i}"] for i in range(n_active)]).mean()
        stats["active_levels"] = torch.tensor(float(n_active))
        # z_q stays float32: the sum of many small residual levels would lose precision in bf16.
        return QuantizerOutput(z_q=z_q, codes=torch.stack(codes, dim=-1), loss=loss, stats=stats)

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        residual = z.float()
        codes = []
        for i in range(self.depth):
            scale = self._scale(i)
            c = self.level(i).encode(residual * scale)
            residual = residual - self.level(i).decode(c).float() / scale
            codes.append(c)
        return torch.stack(codes, dim=-1)

    def decode(self, codes: Tensor, levels: int | None = None) -> Tensor:
        """Sum the first ``levels`` levels (all by default); ``-1`` codes (dropped levels) add nothing."""
        if codes.shape[-1] != self.depth:
            raise ValueError(f"expected codes (B, *grid, {self.depth}), got {tuple(codes.shape)}")
        levels = self.depth if levels is None else int(levels)
        if not 1 <= levels <= self.depth:
            raise ValueError(f"levels must lie in [1, {self.depth}], got {levels}")
        z_q = None
        for i in range(levels):
            c = codes[..., i]
            valid = c >= 0
            q = self.level(i).decode(c.clamp_min(0)).float() / self._scale(i)
            q = q * valid.unsqueeze(1).to(q.dtype)
            z_q = q if z_q is None else z_q + q
        return z_q
