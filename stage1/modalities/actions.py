"""The ``actions`` modality: action chunks ``(B, n, A)`` (n time steps of an A-dimensional action).

Chunks are time-major, as :mod:`data.actions` yields them (``batch["actions"]``), in the data's
normalised units (the DataModule's statistics map them back). Reconstruction losses are L1 (what
VQ-BeT trains its action VQ-VAE with) or MSE; the writer stores ``trajectories.npz`` (the chunks,
and labels when given) beside a PNG of the first chunks; metrics are MSE/MAE on the chunks and, for
samples, the Fréchet distance of flattened chunks. Rollout GIFs belong to the environment side
(:mod:`data.actions`), since they need the simulator, not just the actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

from data.atomic import atomic_write
from stage1.modalities.base import Evaluator, FeatureSamples, Modality, save_figure_png

MAX_PLOTTED = 16
LOSSES = ("l1", "l2", "mse")


def env_dims(env: str) -> tuple[int, int]:
    """``(obs_dim, act_dim)`` of a task of :mod:`data.actions` (``mountain_car``, ``pusht``), so configs
    can size a model by naming the environment its DataModule loads."""
    from data.action_envs import env_info

    info = env_info(env)
    return int(info.obs_dim), int(info.act_dim)


def chunk_loss(x: Tensor, xrec: Tensor, kind: str = "l1") -> Tensor:
    """Reconstruction loss of action chunks: ``"l1"`` (mean absolute error) or ``"l2"``/``"mse"``."""
    if kind not in LOSSES:
        raise ValueError(f"action reconstruction loss must be one of {', '.join(LOSSES)}, got {kind!r}")
    return F.l1_loss(xrec, x) if kind == "l1" else F.mse_loss(xrec, x)


class FlatChunks(nn.Module):
    """Action chunks ``(B, n, A)`` as feature vectors ``(B, n * A)`` (for the Fréchet distance)."""

    def __init__(self, chunk: int, action_dim: int) -> None:
        super().__init__()
        self.num_features = chunk * action_dim

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1).double()


def _plot_chunks(panels: list[list[Tensor]], path: str | Path, titles: list[str] | None = None) -> Path:
    """One small plot per chunk: every action dimension over the chunk's steps (grey: the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        for j, chunk in enumerate(panels[i]):
            values = chunk.float().cpu().numpy()  # (n, A)
            ax.plot(values, lw=1.0, color="0.6" if len(panels[i]) > 1 and j == 0 else None, marker=".")
        ax.set_xticks([])
        if titles:
            ax.set_title(titles[i], fontsize=7)
    return save_figure_png(fig, path)


class ActionReconstruction(Evaluator):
    """MSE and MAE of reconstructed chunks (normalised units)."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.metrics = MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()},
                                        compute_groups=False).to(options.get("device", "cpu"))
        self.notes = ["action metrics on normalised chunks (B, n, A)"]

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        self.metrics["mse"].update(fake.float().flatten(), real.float().flatten())
        self.metrics["mae"].update(fake.float().flatten(), real.float().flatten())

    def compute(self) -> dict[str, Any]:
        return {k: float(v) for k, v in self.metrics.compute().items()}


class ActionsModality(Modality):
    name = "actions"
    datamodule = "data.actions.ActionChunkDataModule"

    def __init__(self, chunk: int = 5, action_dim: int = 2) -> None:
        self.chunk, self.action_dim = chunk, action_dim

    def for_spec(self, code_spec: Mapping[str, Any]) -> ActionsModality:
        """Sized by the chunk length and action dimension a code spec's layout records."""
        layout = code_spec.get("layout") or {}
        return ActionsModality(int(layout.get("chunk", self.chunk)), int(layout.get("action_dim", self.action_dim)))

    def save_reconstructions(self, x: Tensor, xrec: Tensor, path: str | Path) -> Path:
        return _plot_chunks([[a, b] for a, b in zip(x[:MAX_PLOTTED], xrec[:MAX_PLOTTED])], path)

    def save_preview(self, x: Tensor, path: str | Path, labels: Tensor | None = None) -> Path:
        titles = [f"class {int(c)}" for c in labels[:MAX_PLOTTED]] if labels is not None else None
        return _plot_chunks([[c] for c in x[:MAX_PLOTTED]], path, titles)

    def write_samples(self, x: Tensor, out: Path, labels: Tensor | None = None) -> list[Path]:
        """``chunks.png`` (the first 16) and ``trajectories.npz`` with ``actions`` (N, n, A) and ``labels``."""
        arrays = {"actions": x.float().cpu().numpy()}
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy()
        npz = atomic_write(out / "trajectories.npz", lambda f: np.savez(f, **arrays))
        return [self.save_preview(x, out / "chunks.png", labels), npz]

    def reconstruction_evaluator(self, options: Mapping[str, Any]) -> ActionReconstruction:
        return ActionReconstruction(options)

    def sample_evaluator(self, options: Mapping[str, Any]) -> FeatureSamples:
        note = "action_fd: Fréchet distance of flattened normalised chunks (torchmetrics); no classifier"
        return FeatureSamples(FlatChunks(self.chunk, self.action_dim), "action", "class_accuracy", note,
                              device=options.get("device", "cpu"))


MODALITY = ActionsModality()
