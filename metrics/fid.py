"""FID (and Inception Score) with an explicit, always-reported feature extractor.

Two feature spaces, never mixed up and never silently swapped:

* ``inception``: the standard protocol. torch-fidelity's Inception-v3 (TF weights of 2015-12-05,
  file ``weights-inception-2015-12-05-6726825d.pth``; pytorch-fid's ``pt_inception-...`` copy
  is accepted too and loaded strictly), fed uint8 RGB images that the extractor itself resizes
  to 299x299 with torch-fidelity's TF1-compatible bilinear resize, 2048-d pool features. The
  weights load from a given path, a configured folder or the torch hub cache, and when absent
  :class:`MissingWeightsError` says which file to put where: there is no fallback.
* ``domain``: the pooled features of a :class:`~metrics.domain_classifier.DomainClassifier`
  trained on the dataset's labels. Its numbers are comparable only with other numbers from the
  same checkpoint, so the result is labelled with the dataset and checkpoint.

Images come in the project's convention, ``(B, C, H, W)`` floats in [-1, 1]. Every result is a
:class:`FIDResult` carrying the value, the extractor's name, the sample counts and the resolution.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from metrics.domain_classifier import DomainClassifier, DomainFeatures
from metrics.weights import MissingWeightsError, find_weights, missing_message

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILES = [INCEPTION_FILE, "pt_inception-2015-12-05-6726825d.pth"]
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_NAME = "inception-v3 (torch-fidelity 2015-12-05)"


def find_inception_weights(
    weights_path: str | os.PathLike | None = None, weights_dir: str | os.PathLike | None = None
) -> Path:
    """The Inception weight file: ``weights_path`` if given (must exist), else searched by name."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise MissingWeightsError(
                f"Inception-v3 weights not found at the configured path {path}. "
                f"Fetch {INCEPTION_URL} elsewhere and put it there."
            )
        return path
    path = find_weights(INCEPTION_FILES, weights_dir)
    if path is None:
        raise MissingWeightsError(missing_message("Inception FID/IS", INCEPTION_FILE, INCEPTION_URL, weights_dir))
    return path


def inception_extractor(
    feature: str = "2048",
    weights_path: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """torchmetrics' ``NoTrainInceptionV3`` built from the local file (never the network).

    ``feature`` is ``"2048"`` (FID) or ``"logits_unbiased"`` (IS). Input: uint8 ``(B, 3, H, W)``.
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = find_inception_weights(weights_path, weights_dir)
    # torch-fidelity reads the file with weights_only=False; insist first that it is plain tensors.
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not a plain state dict"
        raise ValueError(f"{path} is not a plain tensor state dict; refusing to unpickle it") from err
    # antialias=False: torch-fidelity's TF1-compatible resize, the one the reference numbers use.
    extractor = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=[feature], feature_extractor_weights_path=str(path), antialias=False
    )
    extractor.num_features = 2048 if feature == "2048" else 1008
    extractor.weights_file = str(path)
    return extractor


def to_uint8_rgb(images: Tensor) -> Tensor:
    """``(B, 1|3, H, W)`` floats in [-1, 1] -> uint8 RGB in [0, 255] (grey repeated), as Inception expects."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"Inception takes (B, 1|3, H, W) images, got {tuple(images.shape)}")
    x = ((images.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@dataclass(frozen=True)
class FIDResult:
    """One FID number and everything needed to read it: which features, how many samples, what size."""

    value: float
    feature_extractor: str
    num_real: int
    num_fake: int
    resolution: tuple[int, int] | None

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        size = "x".join(map(str, self.resolution)) if self.resolution else "?"
        return (
            f"FID[{self.feature_extractor}] = {self.value:.4f} "
            f"({self.num_real} real, {self.num_fake} fake, {size})"
        )


class FID(FrechetInceptionDistance):
    """torchmetrics' FID over a named feature extractor, on images in [-1, 1].

    Build it with :func:`inception_fid` or :func:`domain_fid` (or :func:`make_fid` from a config).
    ``update(images, real=...)``; ``compute()`` gives the tensor (for logging) and ``result()``
    the labelled :class:`FIDResult`. Real and fake images must share one resolution.
    """

    def __init__(self, extractor: nn.Module, feature_extractor: str, uint8_inputs: bool, **kwargs) -> None:
        if not isinstance(getattr(extractor, "num_features", None), int):
            raise TypeError("the feature extractor must have an int attribute num_features")
        super().__init__(feature=extractor, **kwargs)
        self.feature_extractor = feature_extractor
        self.uint8_inputs = uint8_inputs
        self.resolution: tuple[int, int] | None = None

    def update(self, images: Tensor, real: bool) -> None:  # type: ignore[override]
        if images.dim() != 4:
            raise ValueError(f"expected (B, C, H, W) images in [-1, 1], got {tuple(images.shape)}")
        size = (int(images.shape[-2]), int(images.shape[-1]))
        if self.resolution is not None and size != self.resolution:
            raise ValueError(f"FID inputs must share one resolution: got {size} after {self.resolution}")
        self.resolution = size
        x = to_uint8_rgb(images) if self.uint8_inputs else images.detach().float()
        super().update(x, real=real)

    def reset(self) -> None:
        super().reset()
        if self.reset_real_features:
            self.resolution = None

    def result(self) -> FIDResult:
        """The (DDP-synchronised) FID with its extractor name, sample counts and resolution."""
        # FID is >= 0; the eigenvalue route can return -1e-7 for identical sets, which is round-off.
        value = max(float(self.compute()), 0.0)
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            num_real = int(self.real_features_num_samples)
            num_fake = int(self.fake_features_num_samples)
        return FIDResult(value, self.feature_extractor, num_real, num_fake, self.resolution)


def inception_fid(
    weights_path: str | os.PathLike | None = None, weights_dir: str | os.PathLike | None = None, **kwargs
) -> FID:
    """Standard Inception FID (2048-d pool features); :class:`MissingWeightsError` without the weights."""
    extractor = inception_extractor("2048", weights_path, weights_dir)
    return FID(extractor, INCEPTION_NAME, uint8_inputs=True, **kwargs)


def domain_fid(classifier: DomainClassifier | str | os.PathLike, name: str | None = None, **kwargs) -> FID:
    """FID on a domain classifier's features, from the model or its checkpoint path.

    The label is ``"domain classifier <dataset> (<checkpoint>)"``; pass ``name`` to override it
    for a model without a checkpoint (e.g. a random network in tests).
    """
    if not isinstance(classifier, DomainClassifier):
        classifier = DomainClassifier.load(classifier)
    if name is None:
        source = classifier.checkpoint_path or "unsaved"
        name = f"domain classifier {classifier.dataset or 'unknown dataset'} ({source})"
    return FID(DomainFeatures(classifier), name, uint8_inputs=False, **kwargs)


def make_fid(
    kind: str,
    checkpoint: str | os.PathLike | None = None,
    weights_path: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    **kwargs,
) -> FID:
    """``kind="inception"`` (needs the Inception weights) or ``kind="domain"`` (needs ``checkpoint``).

    No substitution in either direction: a missing Inception file is an error, not domain FID.
    """
    if kind == "inception":
        return inception_fid(weights_path, weights_dir, **kwargs)
    if kind == "domain":
        if checkpoint is None:
            raise ValueError("domain FID needs the classifier checkpoint (scripts/train_domain_classifier.py)")
        return domain_fid(checkpoint, **kwargs)
    raise ValueError(f"FID kind must be 'inception' or 'domain', got {kind!r}")


class OfflineInceptionScore(InceptionScore):
    """torchmetrics' Inception Score with the locally loaded Inception, on images in [-1, 1]."""

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        weights_dir: str | os.PathLike | None = None,
        splits: int = 10,
        **kwargs,
    ) -> None:
        extractor = inception_extractor("logits_unbiased", weights_path, weights_dir)
        super().__init__(feature=extractor, splits=splits, **kwargs)
        self.feature_extractor = INCEPTION_NAME

    def update(self, images: Tensor) -> None:  # type: ignore[override]
        super().update(to_uint8_rgb(images))
