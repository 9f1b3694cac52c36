"""A small spoken-digit classifier on log-mel spectrograms, to score generated audio.

Like the image domain classifier (:mod:`metrics.domain_classifier`), it is trained on the dataset's
own labels and its pooled features stand in for a pretrained audio network: the Fréchet distance on
them is reported as "digit classifier FD" (never as a standard FAD/FID), and its accuracy on
class-conditional samples says whether a sample sounds like the digit it was asked for.

Input: waveforms ``(B, 1, L)`` in [-1, 1] at ``sample_rate``; a 64-band log-mel (25 ms / 10 ms), three
conv blocks (stride 2 in frequency and time), mean over time and frequency -> ``num_features``-d
features -> logits. Checkpoints are plain dicts that ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from metrics.classifier_fit import fit_classifier

CHECKPOINT_FORMAT = "tokenforge.audio_digit_classifier/1"


class DigitClassifier(nn.Module):
    def __init__(self, sample_rate: int = 16000, num_classes: int = 10, width: int = 16, num_features: int = 64):
        super().__init__()
        self.hparams = {"sample_rate": int(sample_rate), "num_classes": int(num_classes), "width": int(width),
                        "num_features": int(num_features)}
        win = int(0.025 * sample_rate)
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=1 << (win - 1).bit_length(),
                                                        win_length=win, hop_length=int(0.010 * sample_rate),
                                                        n_mels=64, power=1.0)
        w = int(width)
        self.convs = nn.Sequential(*[nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                                                   nn.BatchNorm2d(c_out), nn.ReLU())
                                     for c_in, c_out in ((1, w), (w, 2 * w), (2 * w, 4 * w))])
        self.embed = nn.Linear(4 * w, num_features)
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = int(num_features)

    def features(self, x: Tensor) -> Tensor:
        m = torch.log(self.mel(x.float()) + 1e-5)  # (B, 1, mels, frames)
        return F.relu(self.embed(self.convs(m).mean(dim=(-1, -2))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def save(self, path: str | os.PathLike, val_accuracy: float | None = None) -> Path:
        from data.atomic import atomic_write

        state = {"format": CHECKPOINT_FORMAT, "hparams": self.hparams, "val_accuracy": val_accuracy,
                 "state_dict": {k: v for k, v in self.state_dict().items() if not k.startswith("mel.")}}
        return atomic_write(path, lambda f: torch.save(state, f))

    @classmethod
    def load(cls, path: str | os.PathLike) -> DigitClassifier:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a spoken-digit classifier checkpoint ({CHECKPOINT_FORMAT})")
        model = cls(**state["hparams"])
        model.load_state_dict(state["state_dict"], strict=False)
        return model.eval()


class ClassifierFeatures(nn.Module):
    """The frozen classifier's features (float64) for torchmetrics' Fréchet distance."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)  # torchmetrics toggles modes; BatchNorm must stay in eval

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x).double()


def train_digit_classifier(x: Tensor, y: Tensor, sample_rate: int = 16000, epochs: int = 5, batch_size: int = 32,
                           lr: float = 3e-3, seed: int = 0, **kwargs) -> DigitClassifier:
    """Adam on cross-entropy over clips ``x`` (N, 1, L) with labels ``y`` (N,)."""
    torch.manual_seed(seed)
    model = DigitClassifier(sample_rate, num_classes=int(y.max()) + 1, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    return fit_classifier(model, x, y, opt, epochs, batch_size, seed)


@torch.no_grad()
def accuracy(model: DigitClassifier, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    model.eval()
    hits = sum(int((model(x[i: i + batch_size]).argmax(1) == y[i: i + batch_size]).sum())
               for i in range(0, len(x), batch_size))
    return hits / max(len(x), 1)
