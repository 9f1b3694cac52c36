"""VQ-VAE (van den Oord et al., 2017): conv autoencoder + quantizer, L1/L2 reconstruction loss
(plus the modality's perceptual loss when ``perceptual_weight > 0``; off by default, as in the paper)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stage1.autoencoder import QuantizedAutoencoder, warmup_cosine


class VQVAE(QuantizedAutoencoder):
    """Trained end to end with ``rec_loss [+ perceptual_weight * perceptual] + quantizer loss (+ MoE aux
    loss)`` by one optimiser."""

    def __init__(self, encoder: dict[str, Any], quantizer: dict[str, Any], resolution: int | list[int],
                 embed_dim: int = 64, decoder: dict[str, Any] | None = None, rec_loss: str = "l2",
                 lr: float = 1e-3, betas: list[float] | tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, warmup_steps: int = 0, ema_decay: float | None = None,
                 modality: str = "image", layout: dict[str, Any] | None = None, perceptual_weight: float = 0.0,
                 perceptual: dict[str, Any] | None = None):
        super().__init__(encoder=encoder, quantizer=quantizer, resolution=resolution, embed_dim=embed_dim,
                         decoder=decoder, rec_loss=rec_loss, lr=lr, betas=betas, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, ema_decay=ema_decay, modality=modality, layout=layout,
                         perceptual_weight=perceptual_weight, perceptual=perceptual)
        self.save_hyperparameters()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["x"]
        xrec, q, aux = self(x)
        rec, p_loss, nll = self.nll(x, xrec)
        loss = nll + q.loss + aux.get("aux_loss", 0.0)
        self.check_finite(loss, "the VQ-VAE loss")
        self.log("train/rec_loss", rec, prog_bar=True)
        if self._perceptual:
            self.log("train/p_loss", p_loss.detach())
        self.log("train/q_loss", q.loss.float())
        self.log_quantizer_stats("train", q, aux)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                weight_decay=self.hparams.weight_decay)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, self.hparams.warmup_steps, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
