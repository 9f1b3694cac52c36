"""VQGAN (Esser et al., 2021): quantized autoencoder + perceptual loss + PatchGAN hinge loss.

Two optimisers under Lightning's manual optimisation: the autoencoder minimises
``rec + perceptual_weight * perceptual + quantizer loss + d_weight * disc_factor * g_loss``, where
the perceptual loss is the modality's (LPIPS for images; none for plain sequences) and
``d_weight`` balances the gradients of reconstruction and GAN terms at the decoder's last layer;
the discriminator starts at ``disc_start`` with the hinge (or vanilla) loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stage1.autoencoder import QuantizedAutoencoder, warmup_cosine
from stage1.losses.discriminator import D_LOSSES, PatchDiscriminator, adversarial_objective
from stage1.quantizers.base import QuantizerOutput


class VQGAN(QuantizedAutoencoder):

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
        perceptual_weight: float = 1.0,
        perceptual: dict[str, Any] | None = None,
        disc_start: int = 10000,
        disc_weight: float = 0.8,
        disc_loss: str = "hinge",
        disc_channels: int = 64,
        disc_layers: int = 3,
        disc_lr: float | None = None,
        adaptive_disc_weight: bool = True,
        grad_clip: float | None = None,
        modality: str = "image",
        layout: dict[str, Any] | None = None,
    ):
        super().__init__(encoder=encoder, quantizer=quantizer, resolution=resolution, embed_dim=embed_dim,
                         decoder=decoder, rec_loss=rec_loss, lr=lr, betas=betas, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, ema_decay=ema_decay, modality=modality, layout=layout,
                         perceptual_weight=perceptual_weight, perceptual=perceptual)
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.discriminator = PatchDiscriminator(int(self.decoder.conv_out.out_channels), disc_channels,
                                                disc_layers, dims=self.dims)

    # --------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        opt_ae, opt_d = self.optimizers()
        sched_ae, sched_d = self.lr_schedulers()
        x = batch["x"]
        disc_on = self.global_step >= self.hparams.disc_start

        # Autoencoder (generator) update. No optimizer toggle: its one backward never reaches the
        # discriminator (see generator_objective), whose parameters must keep requires_grad for the
        # logits the discriminator step reuses.
        opt_ae.zero_grad(set_to_none=True)
        xrec, q, aux, terms = self.generator_backward(x, disc_on)
        if self.hparams.grad_clip:
            self.clip_gradients(opt_ae, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt_ae.step()
        sched_ae.step()

        # Discriminator update (hinge on real vs. detached reconstructions; the fake logits are the
        # generator step's, computed with the same discriminator weights).
        d_loss = torch.zeros((), device=x.device)
        if disc_on:
            self.toggle_optimizer(opt_d)
            logits_real = self.discriminator(x.detach())
            logits_fake = terms["logits_fake"]
            d_loss = D_LOSSES[self.hparams.disc_loss](logits_real, logits_fake)
            self.check_finite(d_loss, "the discriminator loss")
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if self.hparams.grad_clip:
                self.clip_gradients(opt_d, gradient_clip_val=self.hparams.grad_clip,
                                    gradient_clip_algorithm="norm")
            # The raw optimiser's step: Lightning would count it as a second global step, and then
            # trainer.max_steps and disc_start would silently mean half as many batches.
            opt_d.optimizer.step()
            sched_d.step()
            self.untoggle_optimizer(opt_d)
            self.log("train/logits_real", logits_real.mean().detach())
            self.log("train/logits_fake", logits_fake.mean().detach())

        self.log("train/rec_loss", terms["rec"], prog_bar=True)
        self.log("train/p_loss", terms["p_loss"])
        self.log("train/q_loss", q.loss.detach().float())
        self.log("train/g_loss", terms["g_loss"])
        self.log("train/d_weight", terms["d_weight"])
        self.log("train/d_loss", d_loss.detach(), prog_bar=True)
        self.log_quantizer_stats("train", q, aux)

    def generator_backward(self, x: Tensor, disc_on: bool) -> tuple[Tensor, QuantizerOutput, dict, dict[str, Tensor]]:
        """Forward the autoencoder and back-propagate its whole loss once (``manual_backward``).

        ``nll + quantizer loss + aux + d_weight * g_loss``; with the adaptive weight, through
        :func:`generator_objective`, which passes through the discriminator (input gradients only)
        and the perceptual net once. Returns ``(xrec, quantizer output, aux, loss terms)``: the terms
        are detached except ``logits_fake`` (present once the discriminator is on), the discriminator's
        logits on the detached reconstruction with their graph.
        """
        xrec, q, aux = self(x)
        rec, p_loss, nll = self.nll(x, xrec)
        rest = q.loss + aux.get("aux_loss", 0.0)
        last_layer = self.decoder.last_layer if self.hparams.adaptive_disc_weight else None
        objective, loss, g_loss, d_weight, logits_fake = adversarial_objective(
            self.discriminator if disc_on else None, xrec, nll, rest, last_layer, self.hparams.disc_weight)
        self.check_finite(loss, "the VQGAN autoencoder loss")
        self.manual_backward(objective)
        terms = {"rec": rec.detach(), "p_loss": p_loss.detach(), "g_loss": g_loss, "d_weight": d_weight,
                 "loss": loss}
        if logits_fake is not None:
            terms["logits_fake"] = logits_fake  # with its graph, for the discriminator step
        return xrec, q, aux, terms

    def configure_optimizers(self) -> Any:
        ae_params = [p for n, p in self.named_parameters() if not n.startswith("discriminator.")]
        betas = tuple(self.hparams.betas)
        opt_ae = torch.optim.Adam(ae_params, lr=self.hparams.lr, betas=betas, weight_decay=self.hparams.weight_decay)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.disc_lr or self.hparams.lr,
                                 betas=betas)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        warm = self.hparams.warmup_steps
        return [opt_ae, opt_d], [
            torch.optim.lr_scheduler.LambdaLR(opt_ae, lambda s: warmup_cosine(s, warm, total)),
            torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: warmup_cosine(s, warm, total)),
        ]
