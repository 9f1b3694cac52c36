"""GIVT (Tschannen et al. 2023): a decoder-only transformer over the real-valued latents of a KL-VAE.

Two changes to a GPT-style prior, as in the paper and big_vision's ``proj/givt``:

* input: a linear projection of each position's latent vector (the base's ``code_embedding`` for a
  ``continuous`` code spec) instead of an embedding table; position 0 holds the class embedding (the
  null class for dropped labels and for the unconditional branch of guidance);
* output: a k-component Gaussian mixture with diagonal covariances per position (:mod:`stage2.gmm`),
  trained by its exact negative log-likelihood.

Latents are normalised per channel with the mean and standard deviation of the training set, measured
once when training starts and stored as buffers (so the checkpoint carries them); samples are mapped
back before decoding. Reported NLL: ``val/loss`` is nats per position (normalised space, summed over
the d channels), ``val/bits_per_dim`` is bits per latent dimension in the tokenizer's own units (the
normalisation's log-Jacobian added back), comparable across priors of the same latents.

Sampling: KV-cached decoding, a temperature that scales every standard deviation, and DB-CFG: with
``cfg_scale = w > 0`` each position is drawn from ``p_c^(1+w) / p_u^w`` by the paper's rejection
sampler (:func:`stage2.gmm.db_cfg_sample`); its acceptance rate is kept in ``last_sampling_stats``.
``w = 0`` is plain conditional sampling (the unconditional branch is not computed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from layers.transformer import Transformer
from stage2.gmm import DBCFGStats, GaussianMixture, GMMHead, db_cfg_sample
from stage2.options import SamplingOption
from stage2.prior import PriorLoss
from stage2.transformer_prior import TransformerPrior, init_gpt_weights

GIVT_SAMPLING = (
    SamplingOption("temperature", float, 1.0, "scale every mixture standard deviation by this (GIVT's t)"),
    SamplingOption("cfg_scale", float, 0.0, "DB-CFG weight w: sample p_c^(1+w) / p_u^w by rejection; 0 = none",
                   flag="--cfg"),
    SamplingOption("use_cache", bool, True, "KV-cached decoding (off: recompute the prefix each step, the reference)"),
    SamplingOption("max_rejection_samples", int, 1000, "DB-CFG: proposals per element before falling back"),
)


def _rows(gmm: GaussianMixture, rows: slice) -> GaussianMixture:
    return GaussianMixture(gmm.logits[rows], gmm.loc[rows], gmm.scale[rows])


class GIVT(TransformerPrior):
    """Causal GIVT prior over continuous latents ``(B, *grid, d)``.

    Args:
        norm, mlp, positions: GIVT's defaults for the causal transformer; it and its other arguments
            (dim, depth, heads, mlp_ratio, dropout, ffn, ffn_every) are :class:`TransformerPrior`'s.
        num_components: mixture components k (GIVT: 16); 1 is a single diagonal Gaussian.
        scale_tol: floor of the mixture scales.
        normalize: normalise latents per channel with training-set statistics.
        norm_items: how many training items the statistics are measured on.
        **prior: the base arguments of :class:`stage2.prior.Prior`.
    """

    code_kinds = frozenset({"continuous"})
    sampling_options = GIVT_SAMPLING

    def __init__(
        self,
        norm: str = "layernorm",
        mlp: str = "gelu",
        positions: str = "learned",
        num_components: int = 16,
        scale_tol: float = 1e-6,
        normalize: bool = True,
        norm_items: int = 20000,
        **prior: Any,
    ):
        super().__init__(norm=norm, mlp=mlp, positions=positions, **prior)
        self.latent_dim = int(self.layout.continuous_dim)  # type: ignore[arg-type]
        dim = self.dim
        self.transformer = self.make_transformer()
        self.embed = self.code_embedding(dim)  # a linear map of the latent vector
        self.classes = self.class_embedding(dim)
        self.apply(init_gpt_weights)
        self.head = GMMHead(dim, self.latent_dim, num_components, scale_tol)  # zero-initialised
        self.register_buffer("latent_mean", torch.zeros(self.latent_dim))
        self.register_buffer("latent_std", torch.ones(self.latent_dim))
        self.register_buffer("norm_items_seen", torch.zeros((), dtype=torch.long))
        self.last_sampling_stats: dict[str, float] = {}

    def make_transformer(self) -> Transformer:
        """The causal transformer; position 0 (the class token) is cell 0. The masked variant
        (:mod:`stage2.givt_maskgit`) overrides this with a bidirectional one."""
        return self.build_transformer(causal=True)

    # --- normalisation ----------------------------------------------------------------------------
    def normalize(self, x: Tensor) -> Tensor:
        return (x.float() - self.latent_mean) / self.latent_std

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self.latent_std + self.latent_mean

    @torch.no_grad()
    def fit_normalization(self, batches: Any, max_items: int) -> None:
        """Per-channel mean and std of the latents in ``batches`` (code-file or raw-data batches)."""
        total = torch.zeros(self.latent_dim, dtype=torch.float64, device=self.device)
        total_sq = torch.zeros_like(total)
        count, items = 0, 0
        for batch in batches:
            codes = batch["codes"] if "codes" in batch else self.encode_batch(batch["x"].to(self.device))
            codes = codes.to(self.device)
            flat = self.flatten_codes(codes).double().reshape(-1, self.latent_dim)
            total += flat.sum(0)
            total_sq += flat.pow(2).sum(0)
            count += flat.shape[0]
            items += codes.shape[0]
            if items >= max_items:
                break
        if count == 0:
            raise ValueError("no training latents to measure the normalisation on")
        mean = total / count
        std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
        self.latent_mean.copy_(mean.float())
        self.latent_std.copy_(std.float().clamp_min(1e-4))
        self.norm_items_seen.fill_(items)

    def on_fit_start(self) -> None:
        if not self.hparams.normalize or int(self.norm_items_seen) > 0:
            return  # measured before (a resumed run) or switched off
        dm = self.trainer.datamodule
        if dm is None:
            raise ValueError("GIVT measures its latent normalisation on the training data: train it through a "
                             "DataModule, call fit_normalization(...) first, or set normalize: false")
        self.fit_normalization(dm.train_dataloader(), int(self.hparams.norm_items))
        rank_zero_info(f"GIVT latent normalisation from {int(self.norm_items_seen)} training items: "
                       f"mean {self.latent_mean.abs().mean():.3g} (|avg|), std {self.latent_std.mean():.3g} (avg)")

    # --- network ----------------------------------------------------------------------------------
    def _inputs(self, z: Tensor, labels: Tensor | None, batch: int) -> Tensor:
        """Position 0: the class embedding; position t > 0: the projection of latent t - 1."""
        start = self.classes(labels, batch)[:, None]
        return self.embed.add_levels(torch.cat([start, self.embed.tokens(z)], dim=1), 0)

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> tuple[GaussianMixture, Tensor, dict[str, Tensor]]:
        """Teacher-forced mixtures for every position, the normalised targets ``(B, N, d)`` and aux."""
        z = self.normalize(self.flatten_codes(codes))
        h, aux = self.transformer(self._inputs(z[:, :-1], labels, z.shape[0]))
        return self.head(h), z, aux

    def loss(self, codes: Tensor, labels: Tensor | None, context: Tensor | None = None,
             generator: torch.Generator | None = None) -> PriorLoss:
        """Exact NLL of the latents under the per-position mixtures; the objective is nats per dimension."""
        gmm, z, aux = self(codes, labels)
        return self.nll_loss(-gmm.log_prob(z).mean(), aux)

    def nll_loss(self, nll_token: Tensor, aux: dict[str, Tensor], name: str = "bits_per_dim",
                 **extra: Tensor) -> PriorLoss:
        """The objective (nats per dimension) from the NLL per position in normalised space, with
        ``name`` = bits per dimension in the tokenizer's units and ``name_normalized`` logged."""
        per_dim = nll_token / self.latent_dim
        log_jacobian = torch.log(self.latent_std).sum() / self.latent_dim  # back to the tokenizer's units
        stats = {name: (per_dim + log_jacobian) / math.log(2), f"{name}_normalized": per_dim / math.log(2), **extra}
        return PriorLoss(per_dim, nll_token, aux, {k: v.detach() for k, v in stats.items()})

    # --- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: int | Sequence[int] | Tensor | None = None,
        temperature: float = 1.0,
        cfg_scale: float = 0.0,
        use_cache: bool = True,
        max_rejection_samples: int = 1000,
        generator: torch.Generator | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Sample ``n`` latent grids ``(n, *grid, d)`` in the tokenizer's units (decode them with it).

        ``cond``: None (the null class), one class, or ``n`` classes; ``cfg_scale`` is DB-CFG's ``w``.
        ``use_cache=False`` recomputes the prefix at each step; both paths draw the same random numbers.
        """
        if cfg_scale < 0:
            raise ValueError(f"the DB-CFG weight cfg_scale must be >= 0, got {cfg_scale}")
        labels, guided = self.guidance_labels(n, cond, cfg_scale)
        rows = labels.shape[0]
        stats = DBCFGStats()
        self.last_sampling_stats = {}
        with self.evaluating():
            z = torch.zeros(rows, self.seq_len, self.latent_dim, device=self.device)
            cache = self.transformer.new_cache(rows, self.seq_len) if use_cache else None
            for t in range(self.seq_len):
                if cache is not None:  # feed position t only: the class token, then the last latent
                    x = self._inputs(z[:, :0], labels, rows) if t == 0 else self.embed(z[:, t - 1 : t], t)
                    h, _ = self.transformer(x, cache)
                else:
                    h, _ = self.transformer(self._inputs(z[:, :t], labels, rows))
                gmm = self.head(h[:, -1]).with_temperature(temperature)
                if guided:
                    nxt, step = db_cfg_sample(_rows(gmm, slice(0, n)), _rows(gmm, slice(n, None)), cfg_scale,
                                              generator, max_samples=max_rejection_samples)
                    stats.add(step)
                else:
                    nxt = gmm.sample(generator)
                z[:, t] = nxt.repeat(rows // n, 1)
        if guided:
            self.last_sampling_stats = {"dbcfg_acceptance": stats.acceptance, "dbcfg_success": stats.success}
        return self.unflatten_codes(self.denormalize(z[:n]))
