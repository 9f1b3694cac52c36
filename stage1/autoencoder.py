"""Shared body of the quantized autoencoders: encoder -> quantizer -> decoder, validation metrics.

:class:`~stage1.vqvae.VQVAE` and :class:`~stage1.vqgan.VQGAN` differ only in their training loss
and optimisers; everything a downstream user touches (``encode``, ``decode``, ``code_spec``,
validation metrics, EMA weights) lives here once.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from layers.instantiate import instantiate
from metrics.codebook import CodebookUsage
from stage1.conv_encoder_decoder import Decoder, Encoder, collect_aux
from stage1.ema import ParameterEMA
from stage1.losses.categorical import grouped_cross_entropy, grouped_softmax
from stage1.modalities import get_modality
from stage1.quantizers.base import Quantizer, QuantizerOutput
from stage1.tokenizer import Tokenizer


def _as_list(resolution: int | list[int], dims: int) -> list[int]:
    if isinstance(resolution, int):
        return [resolution] * dims
    res = [int(r) for r in resolution]
    if len(res) != dims:
        raise ValueError(f"resolution {res} has {len(res)} axes but the encoder is {dims}-D")
    return res


def latent_grid(resolution: int | list[int], dims: int, factor: int) -> tuple[list[int], list[int]]:
    """``(resolution per axis, latent grid)`` for an encoder that downsamples by ``factor``; refuses a
    resolution the factor does not divide."""
    res = _as_list(resolution, dims)
    if any(r % factor for r in res):
        raise ValueError(f"resolution {res} is not divisible by the encoder's downsampling "
                         f"factor {factor} (2**(len(ch_mult)-1))")
    return res, [r // factor for r in res]


class QuantizedAutoencoder(Tokenizer):
    """Encoder, 1x1 projections around a quantizer, decoder; subclasses add the training loss.

    The reconstruction objective is ``rec_loss`` (L1/L2, or ``cross_entropy`` over one-hot channel
    groups of ``layout.classes`` classes, e.g. music tokens, whose ``decode`` returns probabilities)
    plus ``perceptual_weight`` times the modality's perceptual loss (LPIPS for images, none for plain
    sequences; ``perceptual`` holds its options), so a new modality brings its own loss without touching a tokenizer.
    """

    # Recorded at fit time (whether the perceptual loss, e.g. LPIPS weights, was found); not a constructor input.
    recorded_hparams = ("perceptual_active",)

    def __init__(
        self,
        encoder: dict[str, Any],
        quantizer: dict[str, Any],
        resolution: int | list[int],
        embed_dim: int = 64,
        decoder: dict[str, Any] | None = None,
        rec_loss: str = "l1",
        lr: float = 2e-4,
        betas: list[float] | tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float | None = None,
        modality: str = "image",
        layout: dict[str, Any] | None = None,
        perceptual_weight: float = 0.0,
        perceptual: dict[str, Any] | None = None,
    ):
        super().__init__()
        if rec_loss not in ("l1", "l2", "cross_entropy"):
            raise ValueError(f"rec_loss must be 'l1', 'l2' or 'cross_entropy', got {rec_loss!r}")
        if rec_loss == "cross_entropy" and not (layout or {}).get("classes"):
            raise ValueError("rec_loss: cross_entropy needs model.params.layout.classes (one-hot classes per group)")
        if "target" in encoder:
            # A network class of its own (e.g. diffusers' blocks in stage1.diffusers_blocks): both
            # halves are named explicitly, since a decoder cannot be derived from another class.
            if decoder is None or "target" not in decoder:
                raise ValueError("model.params.encoder names a target, so model.params.decoder must name one too "
                                 "(e.g. stage1.diffusers_blocks.DiffusersDecoder)")
            self.encoder = instantiate(encoder, where="model.params.encoder", base=nn.Module)
            self.decoder = instantiate(decoder, where="model.params.decoder", base=nn.Module)
            enc_params, dec_cfg = dict(encoder.get("params") or {}), dict(decoder.get("params") or {})
        else:
            enc_params = dict(encoder)
            self.encoder, self.decoder, dec_cfg = build_encoder_decoder(encoder, decoder)
        self.dims = int(enc_params.get("dims", 2))
        z_channels = int(enc_params.get("z_channels", 64))
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self.dims]
        self.quant_conv = conv(z_channels, embed_dim, 1)
        self.post_quant_conv = conv(embed_dim, int(dec_cfg.get("z_channels", z_channels)), 1)
        qspec = dict(quantizer)
        qspec["params"] = {"dim": embed_dim, **(quantizer.get("params") or {})}
        self.quantizer: Quantizer = instantiate(qspec, where="model.params.quantizer", base=Quantizer)
        self.resolution, self.grid = latent_grid(resolution, self.dims, self.encoder.downsample_factor)
        self.ema = ParameterEMA(self._ema_target(), ema_decay) if ema_decay else None
        depth = getattr(self.quantizer, "depth", None)
        self.val_usage = CodebookUsage(self.quantizer.codebook_size, depth=depth)
        # The modality (from the config, recorded in the code spec) owns the data-specific parts:
        # extra losses, validation metrics, how reconstructions are drawn.
        self.modality = get_modality(modality)
        self.layout = {"channels": int(enc_params.get("in_channels", 3)), "shape": list(self.resolution),
                       **(layout or {})}
        self.out_channels = int(dec_cfg.get("out_channels", self.layout["channels"]))
        self.val_recon = self.modality.validation_metrics()
        self.perceptual_weight, self.perceptual_options = float(perceptual_weight), dict(perceptual or {})
        self._perceptual: list[nn.Module] = []  # a list keeps the frozen loss network out of state_dict

    # ----------------------------------------------------------------------------------- contract
    @property
    def code_spec(self) -> dict[str, Any]:
        """What stage two and the commands read: the modality and data layout, the code grid, the
        codebook, and what the decoder outputs (``(channels, *shape)`` in [-1, 1])."""
        return {"modality": self.modality.name, "layout": dict(self.layout), "grid": list(self.grid),
                "depth": getattr(self.quantizer, "depth", None), "codebook_size": int(self.quantizer.codebook_size),
                "continuous_dim": None,
                "decoder_output": {"channels": self.out_channels,
                                   "shape": list(self.resolution),
                                   "range": [0.0, 1.0] if self._categorical else [-1.0, 1.0]}}

    @property
    def _categorical(self) -> bool:
        """Cross-entropy tokenizers decode to class probabilities per group (one-hot data, e.g. music)."""
        return self.hparams.get("rec_loss") == "cross_entropy"

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        with self._eval_weights():
            return self.quantizer.encode(self.quant_conv(self.encoder(x)))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        with self._eval_weights():
            out = self.decode_latent(self.quantizer.decode(codes))
        return grouped_softmax(out, int(self.layout["classes"])) if self._categorical else out

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """Quantized map -> output; a decoder with spatially conditional norms (MoVQ) also sees ``z_q``."""
        if getattr(self.decoder, "conditions_on_quantized", False):
            return self.decoder(self.post_quant_conv(z_q), z_q)
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput, dict[str, Tensor]]:
        q = self.quantizer(self.quant_conv(self.encoder(x)))
        xrec = self.decode_latent(q.z_q)
        enc_aux, dec_aux = collect_aux(self.encoder), collect_aux(self.decoder)
        aux = {f"encoder.{k}": v for k, v in enc_aux.items() if k != "aux_loss"}
        aux |= {f"decoder.{k}": v for k, v in dec_aux.items() if k != "aux_loss"}
        extra = [a["aux_loss"] for a in (enc_aux, dec_aux) if "aux_loss" in a]
        if extra:
            aux["aux_loss"] = torch.stack(extra).sum()
        return xrec, q, aux

    # ------------------------------------------------------------------------------------ helpers
    def _ema_target(self) -> nn.Module:
        return nn.ModuleList([self.encoder, self.quant_conv, self.quantizer, self.post_quant_conv, self.decoder])

    def _eval_weights(self):
        """Use the averaged weights outside training when an EMA is kept."""
        if self.ema is not None and not self.training:
            return self.ema.swapped(self._ema_target())
        return nullcontext()

    def use_ema_weights(self) -> None:
        """Copy the EMA weights into the live modules for deployment (tokenizing, sampling)."""
        if self.ema is not None:
            with torch.no_grad():
                for s, p in self.ema._pairs(self._ema_target()):
                    p.copy_(s)
            self.ema = None

    def reconstruction_loss(self, x: Tensor, xrec: Tensor) -> Tensor:
        if self._categorical:  # xrec holds logits (forward), x is one-hot
            return grouped_cross_entropy(xrec, x, int(self.layout["classes"]))
        return F.l1_loss(xrec, x) if self.hparams.rec_loss == "l1" else F.mse_loss(xrec, x)

    def setup(self, stage: str) -> None:
        """Build the modality's perceptual loss for training (once; frozen; never in checkpoints)."""
        if stage != "fit" or self.perceptual_weight <= 0 or self._perceptual:
            self.hparams.perceptual_active = bool(self._perceptual)
            return
        self.hparams.perceptual_active = build_perceptual(self.modality, self.perceptual_options, self._perceptual)

    def perceptual_loss(self, x: Tensor, xrec: Tensor) -> Tensor:
        if not self._perceptual:
            return x.new_zeros(())
        return apply_perceptual(self._perceptual, x, xrec)

    def nll(self, x: Tensor, xrec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(rec, perceptual, rec + perceptual_weight * perceptual)``: the reconstruction objective."""
        rec, p_loss = self.reconstruction_loss(x, xrec), self.perceptual_loss(x, xrec)
        return rec, p_loss, rec + self.perceptual_weight * p_loss

    def log_quantizer_stats(self, prefix: str, q: QuantizerOutput, aux: dict[str, Tensor]) -> None:
        on_step = prefix == "train"
        for key, value in {**q.stats, **aux}.items():
            if not torch.is_tensor(value):
                continue
            if value.numel() == 1:
                self.log(f"{prefix}/{key}", value.float(), on_step=on_step, on_epoch=not on_step)
            elif value.dim() == 1 and value.numel() <= 64:  # e.g. per-expert load of an MoE layer
                for i, v in enumerate(value.detach().float()):
                    self.log(f"{prefix}/{key}_{i}", v, on_step=on_step, on_epoch=not on_step)

    def check_finite(self, loss: Tensor, what: str) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{what} became {loss.item()} at step {self.global_step}: lower model.params.lr, enable "
                "trainer.gradient_clip_val (VQ-VAE) or model.params.grad_clip (VQGAN), or use fp32 precision")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self._ema_target())

    # --------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = batch["x"]
        with self._eval_weights():
            xrec, q, _ = self(x)
        self.log("val/rec_loss", self.reconstruction_loss(x, xrec), prog_bar=True, sync_dist=True)
        self.log("val/q_loss", q.loss.float(), sync_dist=True)
        self.val_usage.update(q.codes)
        if self.val_recon is not None:
            self.val_recon.update(xrec.float().clamp(-1, 1), x.float())

    def on_validation_epoch_end(self) -> None:
        log_reconstruction_metrics(self, self.val_recon)
        for key, value in self.val_usage.compute().items():
            self.log(f"val/{key}", value.float(), prog_bar=key == "usage")
        counts = self.val_usage.counts()  # synchronised across ranks (a collective: every rank calls it)
        self.last_val_code_counts = counts.detach().cpu()
        self.log("val/codes_counted", counts.sum().float())
        self.val_usage.reset()


def build_encoder_decoder(encoder: dict[str, Any], decoder: dict[str, Any] | None) -> tuple[Encoder, Decoder, dict]:
    """The conv encoder and its decoder (mirroring the encoder when ``decoder`` is None), and the decoder's
    keyword arguments. The encoder is built first, so seeded initialisation is unchanged."""
    enc = Encoder(**encoder)
    dec_cfg = dict(encoder) if decoder is None else dict(decoder)
    if decoder is None:  # mirror the encoder
        dec_cfg["out_channels"] = dec_cfg.pop("in_channels", 3)
    return enc, Decoder(**dec_cfg), dec_cfg


def build_perceptual(modality: Any, options: dict[str, Any], store: list[nn.Module]) -> bool:
    """Append the modality's frozen perceptual loss (LPIPS for images) to ``store``; warn and return
    False when there is none. ``store`` is a plain list so the loss network stays out of state_dict."""
    loss, note = modality.perceptual_loss(options)
    if loss is None:
        rank_zero_warn(note)
        return False
    store.append(loss.requires_grad_(False).eval())
    return True


def apply_perceptual(store: list[nn.Module], x: Tensor, xrec: Tensor) -> Tensor:
    """The perceptual loss built by :func:`build_perceptual`, moved to ``x``'s device on first use."""
    loss = store[0]
    if next(loss.parameters(), x).device != x.device:
        loss.to(x.device)
    return loss(xrec, x)


def log_reconstruction_metrics(module: Any, val_recon: Any | None) -> None:
    """Log and reset a validation reconstruction metric collection (``val/<metric>``); a no-op when absent.

    Shared by every autoencoder's ``on_validation_epoch_end`` (VQ, KL-VAE, VQ-VAE-2).
    """
    if val_recon is None:
        return
    for key, value in val_recon.compute().items():
        module.log(f"val/{key}", value)
    val_recon.reset()


def warmup_cosine(step: int, warmup: int, total: int | None) -> float:
    """Linear warm-up then (optionally) cosine decay to 10%: the scale for LambdaLR."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if not total or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
