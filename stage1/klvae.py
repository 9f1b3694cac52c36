"""KL-VAE (β-VAE on the taming/LDM conv encoder-decoder): the continuous tokenizer GIVT models.

The encoder's 1x1 ``quant_conv`` emits the mean and log-variance of a diagonal Gaussian posterior
with ``latent_dim`` channels (d = 16 by default, as GIVT; 4..32 allowed); training decodes a
reparametrised sample, validation and ``encode`` use the mean. The loss per sample is::

    sum over pixels of rec(x, x̂) (+ perceptual_weight * LPIPS per pixel)  +  kl_weight * KL(q(z|x) || N(0, I))
    (+ adaptive GAN weight * generator loss, once the discriminator has started)

averaged over the batch. ``rec`` is ``0.5 (x - x̂)^2`` for ``rec_loss: l2`` -- the unit-variance Gaussian
decoder of big_vision's GIVT VAE trainer, so ``kl_weight`` is the paper's β on the same scale -- or
``|x - x̂|`` for ``l1`` (latent diffusion's AutoencoderKL, whose ``kl_weight`` is 1e-6). Smaller β gives
better reconstructions and a harder (higher-entropy) latent distribution for the prior: GIVT's trade-off.
Perceptual (LPIPS) and PatchGAN terms are optional and behave as in :class:`stage1.vqgan.VQGAN`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metrics.latent import LatentStatistics
from metrics.reconstruction import ReconstructionMetrics
from stage1.autoencoder import (
    apply_perceptual,
    build_encoder_decoder,
    build_perceptual,
    latent_grid,
    log_reconstruction_metrics,
    warmup_cosine,
)
from stage1.conv_encoder_decoder import collect_aux
from stage1.gaussian import DiagonalGaussian
from stage1.losses.discriminator import D_LOSSES, PatchDiscriminator, adversarial_objective
from stage1.modalities import get_modality
from stage1.tokenizer import Tokenizer

LATENT_DIMS = range(4, 33)


class KLVAE(Tokenizer):
    """Continuous tokenizer: ``encode(x) -> (B, *grid, latent_dim)`` posterior means, ``decode(codes) -> x``.

    Args:
        encoder, decoder, resolution: as for the quantized autoencoders (the decoder mirrors the encoder).
        latent_dim: channels of the latent (d); the code spec says ``continuous`` with this ``dim``.
        kl_weight: β, the weight of the KL term (see the module docstring for its scale).
        rec_loss: ``"l2"`` (``0.5 (x - x̂)^2``) or ``"l1"``, summed over pixels.
        perceptual_weight, perceptual: optional LPIPS term (``perceptual_weight: 0`` turns it off).
        disc_start: step at which the PatchGAN starts (``None``: no discriminator at all).
        disc_weight, disc_loss, disc_channels, disc_layers, disc_lr, adaptive_disc_weight: as VQGAN.
        lr, betas, weight_decay, warmup_steps, grad_clip: Adam with warm-up then cosine decay.
        modality: the kind of data, recorded in the code spec (writers and metrics of the commands).
    """

    recorded_hparams = ("perceptual_active",)

    def __init__(
        self,
        encoder: dict[str, Any],
        resolution: int | list[int],
        latent_dim: int = 16,
        decoder: dict[str, Any] | None = None,
        kl_weight: float = 1e-4,
        rec_loss: str = "l2",
        lr: float = 4e-4,
        betas: list[float] | tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        perceptual_weight: float = 0.0,
        perceptual: dict[str, Any] | None = None,
        disc_start: int | None = None,
        disc_weight: float = 0.5,
        disc_loss: str = "hinge",
        disc_channels: int = 64,
        disc_layers: int = 3,
        disc_lr: float | None = None,
        adaptive_disc_weight: bool = True,
        grad_clip: float | None = None,
        modality: str = "image",
    ):
        super().__init__()
        if latent_dim not in LATENT_DIMS:
            raise ValueError(f"latent_dim must lie in 4..32 (GIVT uses 16), got {latent_dim}")
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight (β) must be >= 0, got {kl_weight}")
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.encoder, self.decoder, dec_cfg = build_encoder_decoder(encoder, decoder)
        self.dims = int(encoder.get("dims", 2))
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self.dims]
        z_channels = int(encoder.get("z_channels", 64))
        self.latent_dim = int(latent_dim)
        self.quant_conv = conv(z_channels, 2 * self.latent_dim, 1)  # mean and log-variance
        self.post_quant_conv = conv(self.latent_dim, int(dec_cfg.get("z_channels", z_channels)), 1)
        self.resolution, self.grid = latent_grid(resolution, self.dims, self.encoder.downsample_factor)
        self.discriminator = (PatchDiscriminator(int(self.decoder.conv_out.out_channels), disc_channels,
                                                 disc_layers, dims=self.dims) if disc_start is not None else None)
        self._lpips: list[nn.Module] = []  # a list keeps the frozen net out of state_dict
        self.val_latents = LatentStatistics(self.latent_dim)
        self.val_recon = ReconstructionMetrics() if self.dims == 2 else None
        self.last_latent_stats: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------------------------- contract
    @property
    def code_spec(self) -> dict[str, Any]:
        """Continuous codes: ``continuous.dim`` channels per grid cell (``continuous_dim`` repeats it for
        readers of the older key), no codebook; the data layout and what the decoder outputs."""
        channels = int(self.hparams.encoder.get("in_channels", 3))
        return {"modality": self.hparams.modality, "layout": {"channels": channels, "shape": list(self.resolution)},
                "grid": list(self.grid), "depth": None, "codebook_size": None,
                "continuous": {"dim": self.latent_dim}, "continuous_dim": self.latent_dim,
                "decoder_output": {"channels": int(self.decoder.conv_out.out_channels),
                                   "shape": list(self.resolution), "range": [-1.0, 1.0]}}

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    @torch.no_grad()
    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Codes: posterior means channel-last ``(B, *grid, latent_dim)``, the layout of a ``continuous``
        code spec (code files, priors); ``sample=True`` gives reparametrised samples instead."""
        q = self.posterior(x)
        return (q.sample(generator) if sample else q.mean).movedim(1, -1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Channel-last latents ``(B, *grid, latent_dim)`` (any float dtype) -> data."""
        return self.decode_latent(codes.movedim(-1, 1))

    def decode_latent(self, z: Tensor) -> Tensor:
        """Channel-first latents ``(B, latent_dim, *grid)`` -> data (differentiable)."""
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, DiagonalGaussian, dict[str, Tensor]]:
        q = self.posterior(x)
        xrec = self.decode_latent(q.sample() if sample else q.mean)
        aux: dict[str, Tensor] = {}
        extra = [a["aux_loss"] for a in (collect_aux(self.encoder), collect_aux(self.decoder)) if "aux_loss" in a]
        if extra:
            aux["aux_loss"] = torch.stack(extra).sum()
        return xrec, q, aux

    # -------------------------------------------------------------------------------------- losses
    def setup(self, stage: str) -> None:
        """Build the modality's frozen perceptual loss (LPIPS for images) when ``perceptual_weight > 0``,
        exactly as the VQ autoencoders do."""
        if stage != "fit" or self.hparams.perceptual_weight <= 0 or self._lpips:
            self.hparams.perceptual_active = bool(self._lpips)
            return
        self.hparams.perceptual_active = build_perceptual(get_modality(self.hparams.modality),
                                                          dict(self.hparams.perceptual or {}), self._lpips)

    def perceptual_loss(self, x: Tensor, xrec: Tensor) -> Tensor:
        """The modality's perceptual loss (mean LPIPS for images; grey or small images adapted to the trunk)."""
        return apply_perceptual(self._lpips, x, xrec)

    def reconstruction_nll(self, x: Tensor, xrec: Tensor) -> Tensor:
        """Per-pixel reconstruction (+ perceptual) loss summed over a sample, averaged over the batch."""
        err = xrec - x
        per_pixel = 0.5 * err.pow(2) if self.hparams.rec_loss == "l2" else err.abs()
        nll = per_pixel.flatten(1).sum(1).mean()
        if self.hparams.perceptual_weight > 0 and self._lpips:
            # LDM's convention: LPIPS is added to every pixel's loss before the sum.
            nll = nll + self.hparams.perceptual_weight * x[0].numel() * self.perceptual_loss(x, xrec)
        return nll

    def _check_finite(self, loss: Tensor, what: str) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{what} became {loss.item()} at step {self.global_step}: lower "
                                     "model.params.lr or set model.params.grad_clip")

    # ------------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        opts = self.optimizers()
        scheds = self.lr_schedulers()
        opt_ae, opt_d = (opts[0], opts[1]) if isinstance(opts, list) else (opts, None)
        sched_ae, sched_d = (scheds[0], scheds[1]) if isinstance(scheds, list) else (scheds, None)
        x = batch["x"]
        disc_on = self.discriminator is not None and self.global_step >= self.hparams.disc_start

        # No optimizer toggle for the generator: see VQGAN.training_step.
        opt_ae.zero_grad(set_to_none=True)
        xrec, q, terms = self.generator_backward(x, disc_on)
        if self.hparams.grad_clip:
            self.clip_gradients(opt_ae, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt_ae.step()
        sched_ae.step()

        if disc_on:
            self.toggle_optimizer(opt_d)
            logits_real, logits_fake = self.discriminator(x.detach()), terms["logits_fake"]  # the generator step's
            d_loss = D_LOSSES[self.hparams.disc_loss](logits_real, logits_fake)
            self._check_finite(d_loss, "the discriminator loss")
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if self.hparams.grad_clip:
                self.clip_gradients(opt_d, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            opt_d.optimizer.step()  # the raw step: one global step per batch (see VQGAN)
            sched_d.step()
            self.untoggle_optimizer(opt_d)
            self.log("train/d_loss", d_loss.detach(), prog_bar=True)

        with torch.no_grad():
            self.log("train/loss", terms["loss"], prog_bar=True)
            self.log("train/rec_loss", self._mean_rec(x, xrec))
            self.log("train/nll", terms["nll"])
            self.log("train/kl", terms["kl"])
            self.log("train/kl_per_element", terms["kl"] / q.mean[0].numel())
            self.log("train/g_loss", terms["g_loss"])
            self.log("train/d_weight", terms["d_weight"])

    def generator_backward(self, x: Tensor, disc_on: bool) -> tuple[Tensor, DiagonalGaussian, dict[str, Tensor]]:
        """Forward the VAE and back-propagate its whole loss once (``manual_backward``), as
        :meth:`stage1.vqgan.VQGAN.generator_backward`. Returns ``(xrec, posterior, loss terms)``, detached
        but for ``logits_fake`` (once the discriminator is on), kept for the discriminator step."""
        xrec, q, aux = self(x)
        nll = self.reconstruction_nll(x, xrec)
        kl = q.kl().mean()
        rest = self.hparams.kl_weight * kl + aux.get("aux_loss", 0.0)
        last_layer = self.decoder.last_layer if self.hparams.adaptive_disc_weight else None
        objective, loss, g_loss, d_weight, logits_fake = adversarial_objective(
            self.discriminator if disc_on else None, xrec, nll, rest, last_layer, self.hparams.disc_weight)
        self._check_finite(loss, "the KL-VAE loss")
        self.manual_backward(objective)
        terms = {"loss": loss, "nll": nll.detach(), "kl": kl.detach(), "g_loss": g_loss, "d_weight": d_weight}
        if logits_fake is not None:
            terms["logits_fake"] = logits_fake  # with its graph, for the discriminator step
        return xrec, q, terms

    def _mean_rec(self, x: Tensor, xrec: Tensor) -> Tensor:
        """Mean per-pixel reconstruction error (comparable with the quantized tokenizers' rec_loss)."""
        return F.mse_loss(xrec, x) if self.hparams.rec_loss == "l2" else F.l1_loss(xrec, x)

    def configure_optimizers(self) -> Any:
        ae_params = [p for n, p in self.named_parameters() if not n.startswith("discriminator.")]
        betas = tuple(self.hparams.betas)
        opt_ae = torch.optim.Adam(ae_params, lr=self.hparams.lr, betas=betas, weight_decay=self.hparams.weight_decay)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        warm = self.hparams.warmup_steps
        optimizers = [opt_ae]
        if self.discriminator is not None:
            optimizers.append(torch.optim.Adam(self.discriminator.parameters(),
                                               lr=self.hparams.disc_lr or self.hparams.lr, betas=betas))
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: warmup_cosine(s, warm, total)) for o in optimizers]
        return optimizers, scheds

    # ---------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        x = batch["x"]
        xrec, q, _ = self(x, sample=False)
        self.log("val/rec_loss", self._mean_rec(x, xrec), prog_bar=True, sync_dist=True)
        self.log("val/kl", q.kl().mean(), sync_dist=True)
        self.val_latents.update(q.mean, q.logvar)
        if self.val_recon is not None:
            self.val_recon.update(xrec.float().clamp(-1, 1), x.float())

    def on_validation_epoch_end(self) -> None:
        log_reconstruction_metrics(self, self.val_recon)
        stats = self.val_latents.compute()
        self.val_latents.reset()
        self.last_latent_stats = {k: v.detach().cpu() for k, v in stats.items()}
        self.log("val/kl_per_element", stats["kl_per_element"])
        self.log("val/latent_std_min", stats["latent_std"].min())
        self.log("val/latent_std_max", stats["latent_std"].max())
        self.log("val/posterior_std", stats["posterior_std"].mean())
