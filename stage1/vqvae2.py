"""VQ-VAE-2 (Razavi et al., 2019): a hierarchy of code grids, coarse (global) to fine (local).

Wiring, for levels ``0`` (coarsest, "top") .. ``L-1`` (finest, "bottom"), any ``L >= 2`` and any
quantizer of the zoo at each level, 1-D or 2-D (``encoder.dims``):

* encode bottom-up: ``h[L-1] = E[L-1](x)``, ``h[i] = E[i](h[i+1])`` (each encoder downsamples by
  ``2**(len(ch_mult)-1)`` of its level);
* quantize top-down: ``q[0] = Q[0](conv(h[0]))``; for a finer level the quantizer's input also sees
  the coarser codes, decoded up to its grid: ``c[i] = D_c[i](q[i-1])`` (``D_c[i](concat(q[i-1],
  c[i-1]))`` below the second level, so every level sees all coarser ones) and ``q[i] =
  Q[i](conv(concat(h[i], c[i])))``: the paper's "top decoder output concatenated with the bottom
  encoder features before the bottom quantizer";
* decode: every ``q[i]`` is upsampled to the finest grid (nearest + conv steps) and the decoder reads
  their concatenation (the paper's "upsampled top + bottom").

Decoding from codes needs only the quantizers' codebooks, the upsamplers and the decoder; the
conditioning decoders ``D_c`` shape which bottom codes the encoder picks. With ``L = 2`` this is
exactly the two-level model of the paper; more levels serve Jukebox-style 1-D hierarchies.

Codes are a dict ``{level name: (B, *grid[, depth])}``; the code spec names each level's grid
(``"levels"``) and the order coarse to fine (``"level_order"``); see :mod:`stage2.code_layout`.
The loss is the reconstruction loss plus every level's quantizer loss (VQ-VAE's objective per level).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.instantiate import instantiate
from metrics.codebook import CodebookUsage
from stage1.autoencoder import _as_list, log_reconstruction_metrics, warmup_cosine
from stage1.conv_encoder_decoder import Decoder, Encoder, Upsample, _conv
from stage1.modalities import get_modality
from stage1.quantizers.base import Quantizer, QuantizerOutput
from stage1.tokenizer import Tokenizer

# Encoder/Decoder keywords a level may set for itself; the rest come from ``encoder`` (shared).
_LEVEL_KEYS = ("name", "quantizer", "ch_mult")


def _factor(ch_mult: Sequence[int]) -> int:
    return 2 ** (len(ch_mult) - 1)


class VQVAE2(Tokenizer):
    """Hierarchical quantized autoencoder (see the module docstring).

    Args:
        levels: coarse to fine, each ``{name, quantizer: {target, params}, ch_mult}``; ``ch_mult`` is the
            encoder of that level (from the finer level's features, or from the input for the finest)
            and sets its downsampling ``2**(len(ch_mult)-1)``.
        resolution: input size (int or per axis).
        in_channels: input channels.
        z_channels: feature channels between the encoders.
        embed_dim: code vector size of every level (the quantizers' ``dim``).
        encoder: shared :class:`stage1.conv_encoder_decoder.Encoder` keywords (channels, num_res_blocks, groups,
            mid_attn, attn_levels, dims, dropout); the conditioning decoders use them too.
        decoder: :class:`stage1.conv_encoder_decoder.Decoder` keywords of the output decoder; its ``ch_mult``
            defaults to the finest level's (so it undoes the finest encoder's downsampling).
        rec_loss, lr, betas, weight_decay, warmup_steps: training (as :class:`stage1.vqvae.VQVAE`).
        modality, layout: what the data is (recorded in the code spec).
    """

    def __init__(
        self,
        levels: Sequence[Mapping[str, Any]],
        resolution: int | list[int],
        in_channels: int = 3,
        z_channels: int = 64,
        embed_dim: int = 64,
        encoder: Mapping[str, Any] | None = None,
        decoder: Mapping[str, Any] | None = None,
        rec_loss: str = "l2",
        lr: float = 1e-3,
        betas: list[float] | tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        modality: str = "image",
        layout: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if len(levels) < 2:
            raise ValueError(f"VQ-VAE-2 needs at least two levels (coarse to fine), got {len(levels)}")
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        for lv in levels:
            unknown = set(lv) - set(_LEVEL_KEYS)
            if unknown or "name" not in lv or "quantizer" not in lv or "ch_mult" not in lv:
                raise ValueError(f"each level is {{name, quantizer, ch_mult}}; got keys {sorted(lv)}")
        self.names = [str(lv["name"]) for lv in levels]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"level names must differ, got {self.names}")
        shared = dict(encoder or {})
        self.dims = int(shared.get("dims", 2))
        conv = _conv(self.dims)
        n = len(levels)
        mults = [list(lv["ch_mult"]) for lv in levels]

        # encoders, bottom-up: the finest reads the input, each coarser one the finer features
        self.encoders = nn.ModuleList(
            Encoder(in_channels=in_channels if i == n - 1 else z_channels, z_channels=z_channels, ch_mult=mults[i],
                    **shared) for i in range(n))
        # quantizer inputs: features (+ the coarser levels decoded to this grid, below the top)
        self.quant_convs = nn.ModuleList(
            conv(z_channels + (embed_dim if i else 0), embed_dim, 1) for i in range(n))
        self.quantizers = nn.ModuleList()
        for i, lv in enumerate(levels):
            spec = dict(lv["quantizer"])
            spec["params"] = {"dim": embed_dim, **(spec.get("params") or {})}
            self.quantizers.append(instantiate(spec, where=f"model.params.levels[{i}].quantizer", base=Quantizer))
        # conditioning decoders: level i-1's codes (and its own conditioning) up to level i's grid
        cond_shared = {k: v for k, v in shared.items() if k != "mid_ffn"}
        self.cond_decoders = nn.ModuleList(
            Decoder(out_channels=embed_dim, z_channels=embed_dim * (1 if i == 1 else 2), ch_mult=mults[i - 1],
                    **cond_shared) for i in range(1, n))
        # output path: every level upsampled to the finest grid, concatenated, decoded
        self.upsamplers = nn.ModuleList(
            nn.Sequential(*[Upsample(embed_dim, self.dims)
                            for _ in range(int(math.log2(math.prod(_factor(m) for m in mults[i:n - 1]))))])
            for i in range(n))
        dec = {**cond_shared, "ch_mult": mults[-1], **(decoder or {})}
        self.decoder = Decoder(out_channels=in_channels, z_channels=embed_dim * n, **dec)

        self.resolution = _as_list(resolution, self.dims)
        self.grids: list[list[int]] = []
        size = list(self.resolution)
        for i in reversed(range(n)):
            f = _factor(mults[i])
            if any(s % f for s in size):
                raise ValueError(f"level {self.names[i]!r}: size {size} is not divisible by its encoder's "
                                 f"downsampling {f} (2**(len(ch_mult)-1))")
            size = [s // f for s in size]
            self.grids.insert(0, list(size))
        self.modality = get_modality(modality)
        self.layout = {"channels": int(in_channels), "shape": list(self.resolution), **(layout or {})}
        self.out_channels = int(in_channels)
        self.val_usage = nn.ModuleList(
            CodebookUsage(q.codebook_size, depth=getattr(q, "depth", None)) for q in self.quantizers)
        self.val_recon = self.modality.validation_metrics()

    # ----------------------------------------------------------------------------------- contract
    @property
    def code_spec(self) -> dict[str, Any]:
        """Hierarchical spec: one named grid per level (``levels``), their order coarse to fine, and the
        largest codebook as ``codebook_size`` (what a code file's integer type must hold)."""
        levels = {name: {"grid": list(grid), "depth": getattr(q, "depth", None), "codebook_size": int(q.codebook_size)}
                  for name, grid, q in zip(self.names, self.grids, self.quantizers)}
        return {"modality": self.modality.name, "layout": dict(self.layout), "levels": levels,
                "level_order": list(self.names), "depth": None,
                "codebook_size": max(v["codebook_size"] for v in levels.values()), "continuous_dim": None,
                "decoder_output": {"channels": self.out_channels, "shape": list(self.resolution),
                                   "range": [-1.0, 1.0]}}

    def quantize(self, x: Tensor) -> list[QuantizerOutput]:
        """Encode bottom-up, quantize top-down (each finer level conditioned on the coarser codes)."""
        feats = [None] * len(self.names)
        h = x
        for i in reversed(range(len(self.names))):
            h = feats[i] = self.encoders[i](h)
        outs: list[QuantizerOutput] = []
        cond = None
        for i, quantizer in enumerate(self.quantizers):
            inp = feats[i] if cond is None else torch.cat([feats[i], cond], dim=1)
            q = quantizer(self.quant_convs[i](inp))
            outs.append(q)
            if i + 1 < len(self.names):
                src = q.z_q if cond is None else torch.cat([q.z_q, cond], dim=1)
                cond = self.cond_decoders[i](src)
        return outs

    def decode_latents(self, z_q: Sequence[Tensor]) -> Tensor:
        """Quantized maps coarse to fine -> output: each upsampled to the finest grid, concatenated, decoded."""
        return self.decoder(torch.cat([up(z) for up, z in zip(self.upsamplers, z_q)], dim=1))

    @torch.no_grad()
    def encode(self, x: Tensor) -> dict[str, Tensor]:
        return {name: q.codes for name, q in zip(self.names, self.quantize(x))}

    @torch.no_grad()
    def decode(self, codes: Mapping[str, Tensor]) -> Tensor:
        missing = [n for n in self.names if n not in codes]
        if missing:
            raise ValueError(f"VQ-VAE-2 decodes all its levels {self.names}; missing {missing}")
        return self.decode_latents([q.decode(codes[n]) for n, q in zip(self.names, self.quantizers)])

    def forward(self, x: Tensor) -> tuple[Tensor, list[QuantizerOutput]]:
        outs = self.quantize(x)
        return self.decode_latents([q.z_q for q in outs]), outs

    # ------------------------------------------------------------------------------------ training
    def reconstruction_loss(self, x: Tensor, xrec: Tensor) -> Tensor:
        return F.l1_loss(xrec, x) if self.hparams.rec_loss == "l1" else F.mse_loss(xrec, x)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["x"]
        xrec, outs = self(x)
        rec = self.reconstruction_loss(x, xrec)
        loss = rec + sum(q.loss for q in outs)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the VQ-VAE-2 loss became {loss.item()} at step {self.global_step}: "
                                     "lower model.params.lr or enable trainer.gradient_clip_val")
        self.log("train/rec_loss", rec, prog_bar=True)
        for name, q in zip(self.names, outs):
            self.log(f"train/{name}/q_loss", q.loss.float())
            for key, value in q.stats.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    self.log(f"train/{name}/{key}", value.float())
        return loss

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, hp.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = batch["x"]
        xrec, outs = self(x)
        self.log("val/rec_loss", self.reconstruction_loss(x, xrec), prog_bar=True, sync_dist=True)
        for name, q, usage in zip(self.names, outs, self.val_usage):
            self.log(f"val/{name}/q_loss", q.loss.float(), sync_dist=True)
            usage.update(q.codes)
        if self.val_recon is not None:
            self.val_recon.update(xrec.float().clamp(-1, 1), x.float())

    def on_validation_epoch_end(self) -> None:
        log_reconstruction_metrics(self, self.val_recon)
        counts = []
        for name, usage in zip(self.names, self.val_usage):
            for key, value in usage.compute().items():
                self.log(f"val/{name}/{key}", value.float())
            counts.append(usage.counts().detach().cpu().reshape(-1))  # a collective: every rank calls it
            usage.reset()
        # the usage histogram callback draws every level's entries side by side
        self.last_val_code_counts = torch.cat(counts)
        self.log("val/codes_counted", counts[-1].sum().float())
