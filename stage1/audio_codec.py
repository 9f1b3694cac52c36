"""Neural audio codec (SoundStream / EnCodec family) as a tokenizer.

SEANet encoder/decoder (``stage1.seanet``, or any encoder/decoder pair named by ``target``), any zoo
quantizer (residual VQ with quantizer dropout for one model at several bitrates, FSQ, residual FSQ,
grouped ...), and EnCodec's training objective under Lightning's manual optimisation, as VQGAN does:

- generator: ``l1 * |x - x̂| + stft * MR-STFT(x̂, x) + mel * multi-scale mel(x̂, x)`` and, from
  ``disc_start``, ``adv * hinge(D(x̂)) + feat * relative feature matching``; all of these act on the
  decoder output, so with ``balancer: true`` they go through EnCodec's loss balancer (each weight is
  its share of the gradient at x̂) instead of being summed; the quantizer's own loss (commitment,
  codebook) is added outside the balancer, as in EnCodec.
- discriminator: EnCodec's multi-scale STFT discriminator with the hinge loss.

Variable length: training sees random crops (the DataModule's ``crop``); ``encode`` right-pads a clip
to a multiple of the hop; :meth:`tokenize_clips` returns codes with each clip's length, and
``decode(codes, length=...)`` cuts the output back to it (zeroing each item's padding).
``decode(codes, levels=d)`` decodes the first ``d`` residual levels (the bitrate-``d`` output).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stage1.autoencoder import QuantizedAutoencoder, warmup_cosine
from stage1.losses.audio import (
    LossBalancer,
    MultiScaleMelLoss,
    MultiScaleSTFTDiscriminator,
    discriminator_hinge_loss,
    feature_matching_loss,
    generator_hinge_loss,
    multi_resolution_stft_loss,
)


class AudioCodec(QuantizedAutoencoder):

    def __init__(
        self,
        encoder: dict[str, Any],
        quantizer: dict[str, Any],
        resolution: int | list[int],
        sample_rate: int = 16000,
        embed_dim: int = 128,
        decoder: dict[str, Any] | None = None,
        lr: float = 3e-4,
        betas: list[float] | tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float | None = None,
        l1_weight: float = 0.1,
        stft_weight: float = 1.0,
        mel_weight: float = 1.0,
        adv_weight: float = 3.0,
        feat_weight: float = 3.0,
        balancer: bool = False,
        balancer_beta: float = 0.999,
        stft_fft_sizes: list[int] | tuple[int, ...] = (1024, 512, 256, 128),
        mel_scales: list[int] | tuple[int, ...] = (5, 6, 7, 8, 9, 10),
        disc_start: int = 0,
        disc_n_ffts: list[int] | tuple[int, ...] = (1024, 512, 256, 128),
        disc_filters: int = 32,
        disc_lr: float | None = None,
        grad_clip: float | None = None,
        modality: str = "audio",
        layout: dict[str, Any] | None = None,
    ):
        layout = {"sample_rate": int(sample_rate), **(layout or {})}
        super().__init__(encoder=encoder, quantizer=quantizer, resolution=resolution, embed_dim=embed_dim,
                         decoder=decoder, rec_loss="l1", lr=lr, betas=betas, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, ema_decay=ema_decay, modality=modality, layout=layout)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.hop = int(self.encoder.downsample_factor)
        # A list keeps the fixed loss transforms (windows, mel filterbanks) out of the state_dict, so
        # checkpoints do not depend on how a loss is parameterised.
        self._spectral = [multi_resolution_stft_loss(stft_fft_sizes), MultiScaleMelLoss(sample_rate, mel_scales)]
        self.discriminator = MultiScaleSTFTDiscriminator(disc_n_ffts, self.out_channels, disc_filters)
        self.weights = {"l1": l1_weight, "stft": stft_weight, "mel": mel_weight, "adv": adv_weight,
                        "feat": feat_weight}
        self.balancer = LossBalancer(self.weights, beta=balancer_beta) if balancer else None

    # ------------------------------------------------------------------------------- variable length
    def pad_to_hop(self, x: Tensor) -> Tensor:
        return F.pad(x, (0, (-x.shape[-1]) % self.hop))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return super().encode(self.pad_to_hop(x))

    @torch.no_grad()
    def decode(self, codes: Tensor, levels: int | None = None, length: int | Tensor | None = None) -> Tensor:
        """Codes -> waveform; ``levels``: decode only the first residual levels; ``length``: one int, or
        each item's length (B,), to cut the output to (samples past an item's length are zeroed)."""
        with self._eval_weights():
            z_q = self.quantizer.decode(codes) if levels is None else self.quantizer.decode(codes, levels=levels)
            x = self.decode_latent(z_q)
        if length is None:
            return x
        lengths = torch.as_tensor(length, device=x.device).long().reshape(-1)
        x = x[..., : int(lengths.max())]
        if lengths.numel() > 1:
            x = x * (torch.arange(x.shape[-1], device=x.device) < lengths[:, None]).unsqueeze(1)
        return x

    def tokenize_clips(self, x: Tensor, lengths: Tensor | None = None) -> dict[str, Tensor]:
        """Whole clips -> ``{"codes", "length"}``: the padding is recorded so decode restores the length."""
        if lengths is None:
            lengths = torch.full((len(x),), x.shape[-1], dtype=torch.long, device=x.device)
        return {"codes": self.encode(x), "length": lengths}

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Tokenizing (``scripts/tokenize.py``): the base's codes/index/label plus each clip's original
        length, which the code writer stores beside the codes (``{split}-{shard}.lengths.npy``)."""
        out = super().predict_step(batch, batch_idx, dataloader_idx)
        if "length" in batch:
            out["length"] = batch["length"]
        return out

    def decode_clips(self, codes: Tensor, lengths: Tensor, levels: int | None = None) -> list[Tensor]:
        """Codes of tokenized clips and their recorded lengths -> one ``(1, length)`` waveform per clip,
        each exactly its original length (e.g. a code folder's items: ``item["codes"]``, ``item["length"]``)."""
        x = self.decode(codes, levels=levels)
        return [clip[..., : int(n)] for clip, n in zip(x, lengths.reshape(-1).tolist())]

    # ------------------------------------------------------------------------------------- losses
    def reconstruction_loss(self, x: Tensor, xrec: Tensor) -> Tensor:
        """The weighted waveform + spectral objective (what ``val/rec_loss`` reports)."""
        losses = self.generator_losses(x, xrec, adversarial=False)
        return sum(self.weights[k] * v for k, v in losses.items())

    def generator_losses(self, x: Tensor, xrec: Tensor, adversarial: bool,
                         feats_real: list[list[Tensor]] | None = None) -> dict[str, Tensor]:
        """The generator's terms; ``feats_real``: the discriminator's features of ``x`` when the caller has
        them already (they are targets: detached either way)."""
        stft_loss, mel_loss = self._spectral
        if next(mel_loss.buffers()).device != x.device:
            for loss in self._spectral:
                loss.to(x.device)
        losses = {"l1": F.l1_loss(xrec, x), "stft": stft_loss(xrec.float(), x.float()), "mel": mel_loss(xrec, x)}
        if adversarial:
            logits_fake, feats_fake = self.discriminator(xrec)
            if feats_real is None:
                _, feats_real = self.discriminator(x)
            losses["adv"] = generator_hinge_loss(logits_fake)
            losses["feat"] = feature_matching_loss(feats_real, feats_fake)
        return {k: v for k, v in losses.items() if self.weights[k] > 0}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        x = self.pad_to_hop(batch["x"])
        adversarial = self.global_step >= self.hparams.disc_start and (self.weights["adv"] > 0
                                                                        or self.weights["feat"] > 0)
        logits_real = feats_real = None
        if adversarial:
            # D(x) once per step: its features are the feature-matching targets of the generator step and
            # its logits the real term of the discriminator step. The generator's optimiser step does not
            # touch D, so the discriminator step's D(x) would recompute exactly these values.
            logits_real, feats_real = self.discriminator(x)

        self.toggle_optimizer(opt_g)
        xrec, q, aux = self(x)
        losses = self.generator_losses(x, xrec, adversarial, feats_real)
        weighted = sum(self.weights[k] * v for k, v in losses.items())
        self.check_finite(weighted + q.loss, "the codec's generator loss")
        opt_g.zero_grad(set_to_none=True)
        if self.balancer is not None:
            grad = self.balancer.backward_gradient(losses, xrec)
            self.manual_backward((xrec * grad).sum() + q.loss + aux.get("aux_loss", 0.0))
        else:
            self.manual_backward(weighted + q.loss + aux.get("aux_loss", 0.0))
        if self.hparams.grad_clip:
            self.clip_gradients(opt_g, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        sched_g.step()
        self.untoggle_optimizer(opt_g)

        d_loss = torch.zeros((), device=x.device)
        if adversarial:
            self.toggle_optimizer(opt_d)
            logits_fake, _ = self.discriminator(xrec.detach())
            d_loss = discriminator_hinge_loss(logits_real, logits_fake)
            self.check_finite(d_loss, "the discriminator loss")
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if self.hparams.grad_clip:
                self.clip_gradients(opt_d, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            opt_d.optimizer.step()  # the raw step: Lightning would count a second global step
            sched_d.step()
            self.untoggle_optimizer(opt_d)

        # rec_loss: the spectral + waveform reconstruction objective (what should fall during training).
        self.log("train/rec_loss", sum(self.weights[k] * losses[k] for k in ("l1", "stft", "mel") if k in losses)
                 .detach(), prog_bar=True)
        for k, v in losses.items():
            self.log(f"train/{k}_loss", v.detach())
        if self.balancer is not None:
            for k, v in self.balancer.stats.items():
                self.log(f"train/grad_norm_{k}", v)
        self.log("train/q_loss", q.loss.detach().float())
        self.log("train/d_loss", d_loss.detach())
        self.log_quantizer_stats("train", q, aux)

    def configure_optimizers(self) -> Any:
        g_params = [p for n, p in self.named_parameters() if not n.startswith("discriminator.")]
        betas = tuple(self.hparams.betas)
        opt_g = torch.optim.Adam(g_params, lr=self.hparams.lr, betas=betas, weight_decay=self.hparams.weight_decay)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.disc_lr or self.hparams.lr,
                                 betas=betas)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        warm = self.hparams.warmup_steps
        return [opt_g, opt_d], [
            torch.optim.lr_scheduler.LambdaLR(opt_g, lambda s: warmup_cosine(s, warm, total)),
            torch.optim.lr_scheduler.LambdaLR(opt_d, lambda s: warmup_cosine(s, warm, total)),
        ]
