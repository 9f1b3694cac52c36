"""VQ-BeT's behaviour tokenizer (Lee et al. 2024): a residual VQ over action chunks.

A chunk of ``n`` actions ``(B, n, A)`` (normalised units, as :mod:`data.actions` yields them) is
flattened and mapped by a small MLP encoder to one latent vector, quantized by a residual quantizer
(VQ-BeT: 2 levels of small codebooks, e.g. 16 codes each) and decoded by a mirrored MLP back to the
chunk. Codes are ``(B, 1, depth)``: a grid of one cell, so every stage-two prior reads them like
any other residual codes (``depth`` tokens per chunk: the primary code, then the secondary).

Any zoo quantizer can be configured (``quantizer: {target, params}``; ``dim`` is set to
``embed_dim``); VQ-BeT's own choice is :class:`stage1.quantizers.residual.ResidualQuantizer` over
EMA VQ levels, whose one straight-through estimator on the sum hands the encoder the reconstruction
gradient once. Objective (official code): ``L1(chunk, decoded) + quantizer_weight * quantizer loss``
(the official VQ-VAE weights its commitment loss by 5); ``rec_loss: l2`` swaps in MSE. Validation
logs the chunk MSE and L1 and the codebook usage and perplexity per level.

The DataModule's normalisation statistics are copied into buffers when training starts (so the
checkpoint alone maps decoded chunks back to environment units with :meth:`unnormalize_actions`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from layers.instantiate import instantiate
from metrics.codebook import CodebookUsage
from stage1.modalities import get_modality
from stage1.modalities.actions import chunk_loss, env_dims
from stage1.quantizers.base import Quantizer, QuantizerOutput
from stage1.tokenizer import Tokenizer


def mlp(in_dim: int, hidden_dim: int, out_dim: int, hidden_layers: int) -> nn.Sequential:
    """``in -> hidden (ReLU) x hidden_layers -> out``: the MLP of VQ-BeT's encoder and decoder."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def statistics_of(datamodule: Any, key: str) -> tuple[Tensor, Tensor] | None:
    """``(mean, std)`` of ``"actions"`` or ``"obs"`` that a DataModule exposes, else None.

    Accepted forms: ``datamodule.stats`` / ``datamodule.normalization`` as a mapping with
    ``{key: {"mean", "std"}}`` or ``{f"{key}_mean", f"{key}_std"}`` entries.
    """
    for name in ("stats", "normalization", "normalisation"):
        stats = getattr(datamodule, name, None)
        if callable(stats):
            stats = stats()
        if not isinstance(stats, Mapping):
            continue
        entry = stats.get(key) or stats.get({"actions": "action", "obs": "observation"}[key])
        if isinstance(entry, Mapping) and "mean" in entry and "std" in entry:
            return torch.as_tensor(entry["mean"]).float().reshape(-1), torch.as_tensor(entry["std"]).float().reshape(-1)
        if f"{key}_mean" in stats and f"{key}_std" in stats:
            return (torch.as_tensor(stats[f"{key}_mean"]).float().reshape(-1),
                    torch.as_tensor(stats[f"{key}_std"]).float().reshape(-1))
    return None


class Standardizer(nn.Module):
    """``(x - mean) / std`` per feature, with the statistics held as buffers (saved in checkpoints)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def set(self, mean: Tensor, std: Tensor) -> None:
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(f"statistics of shape {tuple(mean.shape)}/{tuple(std.shape)} for features "
                             f"of size {self.mean.numel()}")
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-6))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x)) / self.std.to(x)

    def unnormalize(self, x: Tensor) -> Tensor:
        return x * self.std.to(x) + self.mean.to(x)


class ActionVQ(Tokenizer):
    """MLP encoder -> (residual) quantizer -> MLP decoder over action chunks ``(B, chunk, action_dim)``.

    ``action_dim`` may be left out when ``env`` names a task of :mod:`data.actions` (configs pass
    ``${data.params.env}``, so switching the task is one data override).
    """

    def __init__(
        self,
        chunk: int,
        quantizer: dict[str, Any],
        action_dim: int | None = None,
        env: str | None = None,
        embed_dim: int = 64,
        hidden_dim: int = 128,
        hidden_layers: int = 2,
        rec_loss: str = "l1",
        quantizer_weight: float = 5.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        betas: list[float] | tuple[float, float] = (0.9, 0.999),
        modality: str = "actions",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        chunk_loss(torch.zeros(1), torch.zeros(1), rec_loss)  # refuses an unknown loss name now
        if action_dim is None:
            if env is None:
                raise ValueError("give model.params.action_dim, or env (e.g. ${data.params.env}) to read it from")
            action_dim = env_dims(env)[1]
        self.chunk, self.action_dim = int(chunk), int(action_dim)
        self.encoder = mlp(self.chunk * self.action_dim, hidden_dim, embed_dim, hidden_layers)
        self.decoder = mlp(embed_dim, hidden_dim, self.chunk * self.action_dim, hidden_layers)
        qspec = dict(quantizer)
        qspec["params"] = {"dim": embed_dim, **(quantizer.get("params") or {})}
        self.quantizer: Quantizer = instantiate(qspec, where="model.params.quantizer", base=Quantizer)
        self.depth = getattr(self.quantizer, "depth", None)
        self.modality = get_modality(modality)
        self.actions = Standardizer(self.action_dim)
        self.val_usage = CodebookUsage(self.quantizer.codebook_size, depth=self.depth)

    # ----------------------------------------------------------------------------------- contract
    @property
    def code_spec(self) -> dict[str, Any]:
        shape = [self.chunk, self.action_dim]
        return {"modality": self.modality.name,
                "layout": {"channels": self.action_dim, "shape": shape, "chunk": self.chunk,
                           "action_dim": self.action_dim},
                "grid": [1], "depth": self.depth, "codebook_size": int(self.quantizer.codebook_size),
                "continuous_dim": None,
                "decoder_output": {"channels": self.action_dim, "shape": shape, "range": None}}

    def _check(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.chunk, self.action_dim):
            raise ValueError(f"expected action chunks (B, {self.chunk}, {self.action_dim}), got {tuple(x.shape)}")
        return x.float()

    def latent(self, x: Tensor) -> Tensor:
        """The encoder's latent as a channel-first one-cell grid ``(B, embed_dim, 1)`` (the quantizer contract)."""
        return self.encoder(self._check(x).flatten(1))[..., None]

    def decode_latent(self, z_q: Tensor) -> Tensor:
        return self.decoder(z_q[..., 0]).view(-1, self.chunk, self.action_dim)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Chunks ``(B, n, A)`` -> codes ``(B, 1[, depth])``."""
        return self.quantizer.encode(self.latent(x))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes ``(B, 1[, depth])`` -> chunks ``(B, n, A)`` (normalised units)."""
        return self.decode_latent(self.quantizer.decode(codes))

    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        q = self.quantizer(self.latent(x))
        return self.decode_latent(q.z_q), q

    def unnormalize_actions(self, chunks: Tensor) -> Tensor:
        """Normalised chunks -> environment units, with the statistics of the data it was trained on."""
        return self.actions.unnormalize(chunks)

    def normalize_actions(self, chunks: Tensor) -> Tensor:
        return self.actions.normalize(chunks)

    # ----------------------------------------------------------------------------------- training
    @staticmethod
    def chunks_of(batch: Mapping[str, Tensor]) -> Tensor:
        """The action chunks of a batch: ``"actions"`` (data.actions) or ``"x"`` (the commands' key)."""
        return batch["actions"] if "actions" in batch else batch["x"]

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        stats = statistics_of(dm, "actions") if stage == "fit" and dm is not None else None
        if stats is not None:
            self.actions.set(*stats)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        x = self.chunks_of(batch).float()
        xrec, q = self(x)
        rec = chunk_loss(x, xrec, self.hparams.rec_loss)
        loss = rec + self.hparams.quantizer_weight * q.loss
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/rec_loss", rec)
        self.log("train/q_loss", q.loss.float())
        self.log("train/mse", chunk_loss(x, xrec.detach(), "mse"))
        for key, value in q.stats.items():
            if torch.is_tensor(value) and value.numel() == 1:
                self.log(f"train/{key}", value.float())
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        x = self.chunks_of(batch).float()
        xrec, q = self(x)
        self.log("val/rec_loss", chunk_loss(x, xrec, self.hparams.rec_loss), prog_bar=True, sync_dist=True)
        self.log("val/mse", chunk_loss(x, xrec, "mse"), sync_dist=True)
        self.log("val/q_loss", q.loss.float(), sync_dist=True)
        self.val_usage.update(q.codes)

    def on_validation_epoch_end(self) -> None:
        for key, value in self.val_usage.compute().items():
            self.log(f"val/{key}", value.float(), prog_bar=key == "usage")
        self.last_val_code_counts = self.val_usage.counts().detach().cpu()
        self.val_usage.reset()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        out = {"codes": self.encode(self.chunks_of(batch)), "index": batch["index"]}
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    def configure_optimizers(self) -> Any:
        # VQ-BeT's VQ-VAE: Adam, lr 1e-3, weight decay 1e-4, constant rate
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                 weight_decay=self.hparams.weight_decay)
