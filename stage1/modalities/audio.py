"""The ``audio`` modality: mono waveforms ``(B, 1, L)`` in [-1, 1] (e.g. ``data.audio``'s spoken digits).

- Loss for tokenizers that ask for one (``perceptual``): auraloss's multi-resolution STFT loss. The
  codec (``stage1.audio_codec``) adds its own mel, adversarial and feature-matching terms.
- Files: WAV (soundfile, 16-bit PCM at the code spec's ``layout.sample_rate``) plus a PNG of log-mel
  spectrograms; reconstructions are drawn original above reconstruction, with their WAVs beside.
- Metrics: mel distance (mean |log-mel difference|, 64 mels), multi-resolution STFT distance
  (auraloss), SI-SNR (torchmetrics); for samples, a Fréchet distance on mean+std log-mel features
  and the accuracy of a nearest-class-mean template classifier fit on the real split (named as such);
  with ``classifier`` (a ``metrics.audio_classifier`` checkpoint) the FD is on that trained digit
  classifier's features (``digit_classifier_fd``, not FAD) and its accuracy is reported per class.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.image.fid import FrechetInceptionDistance

from data.atomic import atomic_write
from stage1.modalities.base import Evaluator, Modality, save_figure_png

MAX_SHOWN = 16
DEFAULT_SAMPLE_RATE = 16000
N_MELS = 64


class LogMel(nn.Module):
    """``(B, 1, L) -> (B, n_mels, frames)``: log(1e-5 + mel magnitude), 64 mels, 25 ms / 10 ms windows."""

    def __init__(self, sample_rate: int, n_mels: int = N_MELS):
        super().__init__()
        n_fft = 1 << (int(0.025 * sample_rate) - 1).bit_length()
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, win_length=int(0.025 * sample_rate),
                                                        hop_length=int(0.010 * sample_rate), n_mels=n_mels, power=1.0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(self.mel(x.float()).squeeze(1) + 1e-5)


class LogMelStatistics(nn.Module):
    """Mean and std over time of each log-mel band: fixed-size features for Fréchet distances."""

    def __init__(self, sample_rate: int):
        super().__init__()
        self.logmel = LogMel(sample_rate)
        self.num_features = 2 * N_MELS

    def forward(self, x: Tensor) -> Tensor:
        m = self.logmel(x)
        return torch.cat([m.mean(-1), m.std(-1)], dim=1).double()


def write_wav(path: str | Path, x: Tensor, sample_rate: int) -> Path:
    """One clip ``(1, L)`` or ``(L,)`` as 16-bit PCM WAV, atomically."""
    import soundfile

    data = x.detach().float().clamp(-1, 1).reshape(-1).cpu().numpy()
    buf = io.BytesIO()
    soundfile.write(buf, data, sample_rate, subtype="PCM_16", format="WAV")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def _plot_spectrograms(clips: list[Tensor], path: str | Path, sample_rate: int, titles: list[str] | None = None,
                       cols: int | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logmel = LogMel(sample_rate)
    n = len(clips)
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(logmel(clips[i].float().reshape(1, 1, -1).cpu())[0].numpy(), origin="lower", aspect="auto",
                      cmap="magma", vmin=np.log(1e-5), vmax=3.0)
            if titles:
                ax.set_title(titles[i], fontsize=7)
    return save_figure_png(fig, path)


class AudioReconstruction(Evaluator):
    """Mel distance, multi-resolution STFT distance and SI-SNR between clips and reconstructions."""

    def __init__(self, options: Mapping[str, Any], sample_rate: int):
        super().__init__()
        import auraloss
        from torchmetrics.audio import ScaleInvariantSignalNoiseRatio

        device = options.get("device", "cpu")
        self.logmel = LogMel(sample_rate).to(device)
        sizes = [1024, 512, 256, 128]
        self.stft = auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=sizes, hop_sizes=[n // 4 for n in sizes],
                                                          win_lengths=sizes)
        self.si_snr = ScaleInvariantSignalNoiseRatio().to(device)
        self.mel_distance, self.stft_distance = MeanMetric().to(device), MeanMetric().to(device)
        self.notes = [f"audio metrics at {sample_rate} Hz: mel_distance = mean |log-mel(x) - log-mel(x_rec)| "
                      "(64 mels, 25/10 ms); stft_distance = auraloss MR-STFT (SC + log-mag L1, FFT 1024..128); "
                      "si_snr_db = torchmetrics scale-invariant SNR"]

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        real, fake = real.float(), fake.float()
        self.mel_distance.update((self.logmel(real) - self.logmel(fake)).abs().flatten(1).mean(1))
        self.stft_distance.update(self.stft(fake, real), weight=len(real))
        self.si_snr.update(fake.squeeze(1), real.squeeze(1))

    def compute(self) -> dict[str, Any]:
        return {"mel_distance": float(self.mel_distance.compute()),
                "stft_distance": float(self.stft_distance.compute()), "si_snr_db": float(self.si_snr.compute())}


class AudioSamples(Evaluator):
    """Fréchet distance of log-mel statistics (real split vs samples) and template-classifier accuracy."""

    def __init__(self, options: Mapping[str, Any], sample_rate: int):
        super().__init__()
        self.device = options.get("device", "cpu")
        self.classifier = None
        if options.get("classifier") and Path(str(options["classifier"])).is_file():
            from metrics.audio_classifier import ClassifierFeatures, DigitClassifier

            self.classifier = DigitClassifier.load(options["classifier"]).to(self.device)
            self.features: nn.Module = ClassifierFeatures(self.classifier)
        else:
            self.features = LogMelStatistics(sample_rate).to(self.device)
        self.fd = FrechetInceptionDistance(feature=self.features, normalize=True).to(self.device)
        self.fd_name = "digit_classifier_fd" if self.classifier is not None else "logmel_fd"
        self.hits: dict[int, list[int]] = {}
        self.class_sums: dict[int, Tensor] = {}
        self.class_counts: dict[int, int] = {}
        self.fakes: list[tuple[Tensor, Tensor]] = []
        self.has_fake = False
        self.notes = ["logmel_fd: Fréchet distance of per-band log-mel mean+std (not a trained network's features); "
                      "template_class_accuracy: nearest class-mean features of the real split (a template "
                      "classifier); with --classifier PATH (scripts/train_audio_classifier.py): "
                      "digit_classifier_fd on that small log-mel CNN's features (not FAD) and its accuracy per class"]

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        if real is not None:
            self.fd.update(real.float(), real=True)
            if labels is not None:
                f = self.features(real).float()
                for c in labels.unique().tolist():
                    self.class_sums[c] = self.class_sums.get(c, 0) + f[labels == c].sum(0)
                    self.class_counts[c] = self.class_counts.get(c, 0) + int((labels == c).sum())
        if fake is not None:
            self.fd.update(fake.float(), real=False)
            self.has_fake = True
            if labels is not None:
                self.fakes.append((self.features(fake).float(), labels))
                if self.classifier is not None:
                    with torch.no_grad():
                        right = self.classifier(fake.float()).argmax(1) == labels
                    for c, ok in zip(labels.tolist(), right.tolist()):
                        self.hits.setdefault(c, []).append(int(ok))

    def compute(self) -> dict[str, Any]:
        results: dict[str, Any] = {}
        if self.has_fake and int(self.fd.fake_features_num_samples) > 1:
            results[self.fd_name] = max(float(self.fd.compute()), 0.0)
        if self.hits:
            results["digit_classifier_accuracy"] = sum(map(sum, self.hits.values())) / sum(map(len, self.hits.values()))
            for c in sorted(self.hits):
                results[f"digit_classifier_accuracy_class{c}"] = sum(self.hits[c]) / len(self.hits[c])
        if self.fakes and self.class_sums:
            classes = sorted(self.class_sums)
            means = torch.stack([self.class_sums[c] / self.class_counts[c] for c in classes])
            feats, labels = (torch.cat(t) for t in zip(*self.fakes))
            predicted = torch.tensor(classes, device=labels.device)[torch.cdist(feats, means).argmin(1)]
            results["template_class_accuracy"] = float((predicted == labels).float().mean())
        return results


class AudioModality(Modality):
    name = "audio"
    datamodule = "data.audio.AudioDataModule"

    def __init__(self, sample_rate: int = DEFAULT_SAMPLE_RATE):
        self.sample_rate = int(sample_rate)

    def for_spec(self, code_spec: Mapping[str, Any]) -> AudioModality:
        """This modality at the sample rate a code spec records (``layout.sample_rate``)."""
        rate = (code_spec.get("layout") or {}).get("sample_rate", self.sample_rate)
        if int(rate) == self.sample_rate:
            return self
        bound = copy.copy(self)
        bound.sample_rate = int(rate)
        return bound

    def perceptual_loss(self, options: Mapping[str, Any]) -> tuple[nn.Module | None, str]:
        import auraloss

        sizes = [int(n) for n in options.get("fft_sizes", (1024, 512, 256, 128))]
        loss = auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=sizes, hop_sizes=[n // 4 for n in sizes],
                                                     win_lengths=sizes)
        return loss, f"auraloss multi-resolution STFT loss (FFT sizes {sizes})"

    def save_reconstructions(self, x: Tensor, xrec: Tensor, path: str | Path) -> Path:
        """Spectrograms: originals (top row of each pair) above reconstructions; WAVs of the first 4 beside."""
        path = Path(path)
        n = min(len(x), 8)
        clips, titles = [], []
        for i in range(n):
            clips += [x[i], xrec[i]]
            titles += [f"original {i}", f"reconstruction {i}"]
        for i in range(min(n, 4)):
            write_wav(path.with_name(f"{path.stem}_{i}_original.wav"), x[i], self.sample_rate)
            write_wav(path.with_name(f"{path.stem}_{i}_reconstruction.wav"), xrec[i], self.sample_rate)
        return _plot_spectrograms(clips, path, self.sample_rate, titles, cols=2)

    def save_preview(self, x: Tensor, path: str | Path, labels: Tensor | None = None) -> Path:
        titles = [f"class {int(c)}" for c in labels[:MAX_SHOWN]] if labels is not None else None
        return _plot_spectrograms(list(x[:MAX_SHOWN]), path, self.sample_rate, titles)

    def write_samples(self, x: Tensor, out: Path, labels: Tensor | None = None) -> list[Path]:
        """``spectrograms.png`` (the first 16), one WAV per sample (``sample_000_class7.wav``) and ``samples.npz``."""
        out = Path(out)
        wavs = []
        for i, clip in enumerate(x):
            tag = f"_class{int(labels[i])}" if labels is not None else ""
            wavs.append(write_wav(out / f"sample_{i:03d}{tag}.wav", clip, self.sample_rate))
        arrays = {"x": x.float().cpu().numpy(), "sample_rate": np.array(self.sample_rate)}
        if labels is not None:
            arrays["labels"] = labels.cpu().numpy()
        npz = atomic_write(out / "samples.npz", lambda f: np.savez(f, **arrays))
        return [self.save_preview(x, out / "spectrograms.png", labels), npz, *wavs]

    def reconstruction_evaluator(self, options: Mapping[str, Any]) -> AudioReconstruction:
        return AudioReconstruction(options, self.sample_rate)

    def sample_evaluator(self, options: Mapping[str, Any]) -> AudioSamples:
        return AudioSamples(options, self.sample_rate)


MODALITY = AudioModality()
