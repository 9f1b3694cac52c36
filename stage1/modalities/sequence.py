"""The ``sequence`` modality: 1-D signals ``(B, C, L)`` in [-1, 1] (e.g. ``data.sequence``'s sines).

No perceptual loss; curves are written as ``samples.npz`` plus a PNG of the plotted curves; metrics
are computed on the signals and on their log-magnitude spectra (a frequency-blind metric would
call a phase-shifted sine a bad reconstruction and a wrong-frequency sine a good sample).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError

from data.atomic import atomic_write
from stage1.modalities.base import Evaluator, FeatureSamples, Modality, save_figure_png

MAX_PLOTTED = 16


def log_spectrum(x: Tensor) -> Tensor:
    """``(B, C, L) -> (B, C * (L // 2 + 1))``: log(1 + |rFFT|) per channel, the features spectra are compared on."""
    return torch.log1p(torch.fft.rfft(x.float(), dim=-1).abs()).flatten(1)


class SpectrumFeatures(nn.Module):
    """Log-magnitude spectra of ``(B, channels, length)`` signals as a feature extractor."""

    def __init__(self, channels: int, length: int) -> None:
        super().__init__()
        self.num_features = channels * (length // 2 + 1)

    def forward(self, x: Tensor) -> Tensor:
        return log_spectrum(x).double()


def _plot_curves(panels: list[list[Tensor]], path: str | Path, titles: list[str] | None = None) -> Path:
    """One small plot per panel, every curve of a panel overlaid (channel 0), in a near-square grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.6 * rows), squeeze=False, sharey=True)
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        overlaid = len(panels[i]) > 1
        for j, curve in enumerate(panels[i]):
            ax.plot(curve[0].float().cpu().numpy(), lw=1.0, color="0.6" if overlaid and j == 0 else "C0")
        ax.set_ylim(-1.05, 1.05)
        ax.set_xticks([])
        if titles:
            ax.set_title(titles[i], fontsize=7)
    return save_figure_png(fig, path)


class SequenceReconstruction(Evaluator):
    """MSE and MAE on the signal, mean SNR in dB, and the L1 distance of log-magnitude spectra."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.metrics = MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError(),
                                         "snr_db": MeanMetric(), "log_spectrum_l1": MeanMetric()},
                                        compute_groups=False).to(options.get("device", "cpu"))
        self.notes = ["sequence metrics on the [-1, 1] signal; snr_db = 10 log10(|x|^2 / |x - x_rec|^2) per item"]

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        real, fake = real.float(), fake.float()
        self.metrics["mse"].update(fake.flatten(), real.flatten())
        self.metrics["mae"].update(fake.flatten(), real.flatten())
        err = (real - fake).pow(2).flatten(1).sum(1).clamp_min(1e-12)
        self.metrics["snr_db"].update(10 * torch.log10(real.pow(2).flatten(1).sum(1) / err))
        self.metrics["log_spectrum_l1"].update((log_spectrum(real) - log_spectrum(fake)).abs().mean(1))

    def compute(self) -> dict[str, Any]:
        return {k: float(v) for k, v in self.metrics.compute().items()}


class SequenceModality(Modality):
    name = "sequence"
    datamodule = "data.sequence.SequenceDataModule"

    def __init__(self, channels: int = 1, length: int = 128) -> None:
        self.channels, self.length = channels, length

    def for_spec(self, code_spec: Mapping[str, Any]) -> SequenceModality:
        """This modality sized by the layout a code spec records (channels, length)."""
        layout = code_spec.get("layout") or {}
        shape = layout.get("shape") or [self.length]
        return SequenceModality(int(layout.get("channels", self.channels)), int(shape[-1]))

    def save_reconstructions(self, x: Tensor, xrec: Tensor, path: str | Path) -> Path:
        """Each input (grey) with its reconstruction (blue) overlaid."""
        return _plot_curves([[a, b] for a, b in zip(x[:MAX_PLOTTED], xrec[:MAX_PLOTTED])], path)

    def save_preview(self, x: Tensor, path: str | Path, labels: Tensor | None = None) -> Path:
        titles = [f"class {int(c)}" for c in labels[:MAX_PLOTTED]] if labels is not None else None
        return _plot_curves([[c] for c in x[:MAX_PLOTTED]], path, titles)

    def write_samples(self, x: Tensor, out: Path, labels: Tensor | None = None) -> list[Path]:
        """``curves.png`` (the first 16) and ``samples.npz`` with ``x`` (N, C, L) and, if given, ``labels``."""
        arrays = {"x": x.float().cpu().numpy()}
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy()
        npz = atomic_write(out / "samples.npz", lambda f: np.savez(f, **arrays))
        return [self.save_preview(x, out / "curves.png", labels), npz]

    def reconstruction_evaluator(self, options: Mapping[str, Any]) -> SequenceReconstruction:
        return SequenceReconstruction(options)

    def sample_evaluator(self, options: Mapping[str, Any]) -> FeatureSamples:
        """Spectral Fréchet distance and template class accuracy (features sized by the code spec's layout)."""
        note = ("spectral_fd: Fréchet distance of log-magnitude spectra (torchmetrics); class_accuracy: nearest "
                "class-mean spectrum of the real split (a template classifier, not a trained one)")
        return FeatureSamples(SpectrumFeatures(self.channels, self.length), "spectral", "class_accuracy", note,
                              device=options.get("device", "cpu"))


MODALITY = SequenceModality()
