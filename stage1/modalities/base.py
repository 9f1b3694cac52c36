"""The modality protocol and its registry.

A modality says what a kind of data means to the rest of the project: the DataModule its configs
use, the extra reconstruction loss a tokenizer adds (LPIPS for images, multi-resolution STFT for
audio, ...), how decoded tensors become files people open (PNG grid, WAV, MIDI, GIF, ``.npz``), and
the metrics ``evaluate`` reports. A tokenizer names its modality in its code spec, and every
command asks :func:`get_modality` for it, so ``train``, ``tokenize``, ``sample`` and ``evaluate``
never branch on the kind of data. A new modality is one file ``stage1/modalities/<name>.py`` that defines
a :class:`Modality` subclass and binds one instance to the module attribute ``MODALITY``.

Import rules: a modality file may import ``data``, ``metrics``, ``layers`` and torch, never a stage
or ``tokenforge`` (``stage1`` imports modalities for the tokenizer's loss and validation metrics).
"""

from __future__ import annotations

import importlib
import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from data.atomic import atomic_write

# The modalities the design plans; those without a file yet say so when asked for.
PLANNED = ("image", "sequence", "audio", "music", "motion", "actions")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Evaluator:
    """Accumulates real and generated (or reconstructed) batches and reports metrics for ``evaluate``.

    For a tokenizer ``update(real=x, fake=reconstruction)`` pairs items; for a prior, real batches
    come first (``update(real=x)``) and samples after (``update(fake=x, labels=classes)``).
    ``notes`` says which features or models were used and what was skipped, for the report.
    """

    def __init__(self) -> None:
        self.notes: list[str] = []

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, Any]:
        raise NotImplementedError


class FeatureSamples(Evaluator):
    """Samples scored on a feature module ``f(x) -> (B, F)`` (with ``num_features``), for modalities
    without a trained feature network: the Fréchet distance of real and generated features
    (torchmetrics' implementation) as ``{prefix}_fd``, and the accuracy of class-conditional samples
    under a nearest-class-mean classifier fit on the real split's features as ``{accuracy_key}``
    (a template classifier, not a trained one: the note says so)."""

    def __init__(self, features: nn.Module, prefix: str, accuracy_key: str, note: str,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.features = features.to(device)
        self.fd = FrechetInceptionDistance(feature=self.features, normalize=True).to(device)
        self.prefix, self.accuracy_key = prefix, accuracy_key
        self.class_sums: dict[int, Tensor] = {}
        self.class_counts: dict[int, int] = {}
        self.fakes: list[tuple[Tensor, Tensor]] = []
        self.notes = [note]

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        if real is not None:
            self.fd.update(real.float(), real=True)
            if labels is not None:
                feats = self.features(real.float()).float()
                for c in labels.unique().tolist():
                    rows = feats[labels == c]
                    self.class_sums[c] = self.class_sums.get(c, 0) + rows.sum(0)
                    self.class_counts[c] = self.class_counts.get(c, 0) + len(rows)
        if fake is not None:
            self.fd.update(fake.float(), real=False)
            if labels is not None:
                self.fakes.append((self.features(fake.float()).float(), labels))

    def compute(self) -> dict[str, Any]:
        results: dict[str, Any] = {}
        if int(self.fd.fake_features_num_samples) > 1 and int(self.fd.real_features_num_samples) > 1:
            results[f"{self.prefix}_fd"] = max(float(self.fd.compute()), 0.0)
        if self.fakes and self.class_sums:
            classes = sorted(self.class_sums)
            means = torch.stack([self.class_sums[c] / self.class_counts[c] for c in classes])
            feats, labels = (torch.cat(t) for t in zip(*self.fakes))
            predicted = torch.tensor(classes, device=labels.device)[torch.cdist(feats, means).argmin(1)]
            results[self.accuracy_key] = float((predicted == labels).float().mean())
        return results


class Modality:
    """One kind of data. Subclasses set ``name`` and ``datamodule`` and override what differs.

    ``options`` given to the evaluators are the command's metric settings (``fid``, ``classifier``,
    ``lpips``, ``inception_weights``, ``dataset``, ``device``); a modality uses those it knows.
    """

    name: str = ""
    datamodule: str = ""  # the DataModule target its configs use

    def for_spec(self, code_spec: Mapping[str, Any]) -> Modality:
        """This modality configured by a code spec (audio reads its sample rate); most need nothing."""
        return self

    # -- training ---------------------------------------------------------------------------------
    def perceptual_loss(self, options: Mapping[str, Any]) -> tuple[nn.Module | None, str]:
        """A frozen loss ``loss(reconstruction, target) -> (B, ...)`` added to the reconstruction term,
        and a sentence saying what it is (or why there is none). ``options``: the tokenizer's
        ``perceptual`` settings."""
        if options:
            raise ValueError(f"the {self.name} modality has no perceptual loss; drop model.params.perceptual "
                             f"({sorted(options)})")
        return None, f"the {self.name} modality has no perceptual loss"

    def validation_metrics(self) -> Metric | None:
        """Reconstruction metrics the tokenizer logs each validation epoch (besides its losses)."""
        return None

    # -- files ------------------------------------------------------------------------------------
    def save_reconstructions(self, x: Tensor, xrec: Tensor, path: str | Path) -> Path:
        """One picture comparing inputs with their reconstructions."""
        raise NotImplementedError

    def save_preview(self, x: Tensor, path: str | Path, labels: Tensor | None = None) -> Path:
        """One picture of a batch (e.g. samples, titled by ``labels`` where the modality can)."""
        raise NotImplementedError

    def write_samples(self, x: Tensor, out: Path, labels: Tensor | None = None) -> list[Path]:
        """Write decoded samples ``x`` as the files people open; returns them, the overview first."""
        raise NotImplementedError

    # -- evaluation -------------------------------------------------------------------------------
    def reconstruction_evaluator(self, options: Mapping[str, Any]) -> Evaluator:
        raise NotImplementedError

    def sample_evaluator(self, options: Mapping[str, Any]) -> Evaluator:
        raise NotImplementedError


def get_modality(name: str | None) -> Modality:
    """The modality registered as ``stage1/modalities/<name>.py``; ``None`` (a spec from before modalities) is image."""
    name = name or "image"
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"modality names are lower-case identifiers, got {name!r}")
    try:
        module = importlib.import_module(f"stage1.modalities.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"stage1.modalities.{name}":
            raise
        planned = f" ({name!r} is planned but not implemented yet)" if name in PLANNED else ""
        raise ValueError(f"unknown modality {name!r}{planned}; available: {', '.join(available())}") from err
    modality = getattr(module, "MODALITY", None)
    if not isinstance(modality, Modality):
        raise ValueError(f"stage1/modalities/{name}.py defines no MODALITY (a Modality instance)")
    return modality


def available() -> list[str]:
    """The names of the modality files present."""
    folder = Path(__file__).parent
    # Helper modules beside the modalities (e.g. motion_render.py) bind no MODALITY and are not listed.
    return sorted(p.stem for p in folder.glob("*.py") if _NAME.match(p.stem) and p.stem not in ("base",)
                  and re.search(r"^MODALITY\s*=", p.read_text(), re.MULTILINE))


def modality_of(code_spec: Mapping[str, Any]) -> Modality:
    """The modality a code spec names, bound to what the spec records (e.g. an audio sample rate)."""
    return get_modality(code_spec.get("modality")).for_spec(code_spec)



def save_figure_png(fig: Any, path: str | Path, dpi: int = 80) -> Path:
    """Lay out a matplotlib figure, render it to PNG in memory, close it and write it atomically.

    Rendering to a buffer first keeps a half-drawn figure from ever reaching ``path``.
    """
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))
