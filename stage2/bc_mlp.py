"""The MLP behaviour-cloning baseline for the actions modality: unimodal regression of the chunk.

The flattened observation history ``(h * O)`` goes through an MLP that outputs the whole action
chunk ``(n * A)``, trained with mean squared error in the DataModule's normalised units. MSE makes
the prediction the conditional *mean* of the demonstrated chunks, so where the expert acts in two
distinct ways from the same observations (first push left or right; orbit clockwise or counter-
clockwise) it predicts their average — the failure VQ-BeT's codes are meant to avoid.

The DataModule's normalisation (``datamodule.stats``) is copied into buffers when training starts,
so the checkpoint alone gives :meth:`policy`, the rollout interface of ``data/action_envs.py``:
raw observation history ``(h, O)`` -> raw action chunk ``(n, A)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from data.actions import env_info
from stage2.optim import parameter_groups, warmup_cosine


def mlp(inputs: int, hidden: int, depth: int, outputs: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, outputs))


class BCMLP(pl.LightningModule):
    """``obs (B, h, O) -> actions (B, n, A)`` by an MLP; see the module docstring."""

    def __init__(self, env: str, history: int, chunk: int, hidden: int = 256, depth: int = 3, dropout: float = 0.0,
                 lr: float = 1e-3, weight_decay: float = 1e-4, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                 max_steps: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        info = env_info(env)
        self.obs_dim, self.act_dim, self.history, self.chunk = info.obs_dim, info.act_dim, int(history), int(chunk)
        self.net = mlp(self.history * self.obs_dim, hidden, depth, self.chunk * self.act_dim, dropout)
        for name, dim in (("obs_mean", self.obs_dim), ("obs_std", self.obs_dim),
                          ("action_mean", self.act_dim), ("action_std", self.act_dim)):
            self.register_buffer(name, torch.zeros(dim) if name.endswith("mean") else torch.ones(dim))

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        stats = getattr(dm, "stats", None) if stage == "fit" else None
        if stats is None:
            return
        with torch.no_grad():
            for key, prefix in (("obs", "obs"), ("actions", "action")):
                for part in ("mean", "std"):
                    getattr(self, f"{prefix}_{part}").copy_(torch.as_tensor(np.asarray(stats[key][part])).float())

    def forward(self, obs: Tensor) -> Tensor:
        """Normalised histories ``(B, h, O)`` -> normalised chunks ``(B, n, A)``."""
        if tuple(obs.shape[1:]) != (self.history, self.obs_dim):
            raise ValueError(f"expected observation histories (B, {self.history}, {self.obs_dim}), "
                             f"got {tuple(obs.shape)}")
        return self.net(obs.flatten(1)).view(-1, self.chunk, self.act_dim)

    def _loss(self, batch: dict[str, Tensor], split: str) -> Tensor:
        loss = nn.functional.mse_loss(self(batch["obs"].float()), batch["actions"].float())
        self.log(f"{split}/loss", loss, prog_bar=split == "train", batch_size=len(batch["obs"]))
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._loss(batch, "val")

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.AdamW(parameter_groups(self, hp.weight_decay), lr=hp.lr)
        total = hp.max_steps
        if total is None and self._trainer is not None:
            est = self.trainer.estimated_stepping_batches
            total = int(est) if est != float("inf") else None
        sched = warmup_cosine(opt, hp.warmup_steps, total, hp.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def act(self, obs_history: Tensor) -> Tensor:
        """Raw histories ``(B, h, O)`` -> raw action chunks ``(B, n, A)``."""
        obs = (obs_history.to(self.device).float() - self.obs_mean) / self.obs_std
        was_training = self.training
        self.eval()
        chunks = self(obs) * self.action_std + self.action_mean
        self.train(was_training)
        return chunks

    def policy(self, obs_history: np.ndarray) -> np.ndarray:
        """The rollout interface: one raw history ``(h, O)`` -> one raw chunk ``(n, A)`` (float32)."""
        obs = torch.as_tensor(np.asarray(obs_history, dtype=np.float32))[None]
        return self.act(obs)[0].cpu().numpy().astype(np.float32)

    @classmethod
    def load(cls, path: str | Path, map_location: str = "cpu") -> BCMLP:
        """A trained policy from its Lightning checkpoint alone (read with ``weights_only=True``)."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        model = cls(**ckpt["hyper_parameters"])
        model.load_state_dict(ckpt["state_dict"])
        return model.eval()
