"""Choosing the feature space for FID / precision-recall and LPIPS in ``evaluate``.

Never a silent substitution: ``fid="inception"`` without its weights is an error, ``fid="domain"``
without a classifier is an error, and ``fid="auto"`` picks Inception when its weights are present,
else a domain classifier when one is found, else no FID — and the report says which (and why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from metrics.domain_classifier import DomainClassifier
from metrics.fid import FID, domain_fid, find_inception_weights, inception_fid, to_uint8_rgb
from metrics.lpips_offline import load_lpips
from metrics.weights import MissingWeightsError


@dataclass
class FeatureChoice:
    fid: FID | None
    classifier: DomainClassifier | None
    note: str
    extras: dict[str, Any] = field(default_factory=dict)

    def features(self, images: Tensor) -> Tensor:
        """The same features FID uses, for precision/recall."""
        assert self.fid is not None
        x = to_uint8_rgb(images) if self.fid.uint8_inputs else images
        return self.fid.inception(x).float().flatten(1)


def default_classifier_path(dataset: str | None) -> Path | None:
    """Where ``scripts/train_domain_classifier.py --dataset NAME`` writes by default."""
    if not dataset:
        return None
    path = Path("runs") / "domain" / f"{dataset}.pt"
    return path if path.is_file() else None


def choose_features(kind: str, classifier: str | None, dataset: str | None,
                    inception_weights: str | None = None) -> FeatureChoice:
    if kind not in ("auto", "inception", "domain", "none"):
        raise ValueError(f"--fid must be auto, inception, domain or none, got {kind!r}")
    if kind == "none":
        return FeatureChoice(None, None, "FID not requested (--fid none)")
    clf_path = classifier or default_classifier_path(dataset)
    clf = DomainClassifier.load(clf_path) if clf_path else None
    if kind == "inception" or (kind == "auto" and _inception_available(inception_weights)):
        fid = inception_fid(weights_path=inception_weights)
        return FeatureChoice(fid, clf, f"FID on {fid.feature_extractor} features")
    if clf is None:
        if kind == "domain":
            raise FileNotFoundError(
                f"--fid domain needs a domain classifier: pass --classifier PATH or train one with "
                f"`python scripts/train_domain_classifier.py --dataset {dataset or 'NAME'} "
                f"--out runs/domain/{dataset or 'NAME'}.pt`")
        return FeatureChoice(None, None, "FID skipped: no Inception weights (see README) and no domain classifier "
                                         f"(runs/domain/{dataset}.pt or --classifier)")
    fid = domain_fid(clf)
    return FeatureChoice(fid, clf, f"FID on {fid.feature_extractor} features (not Inception: "
                                   "comparable only with numbers from the same classifier)")


def _inception_available(path: str | None) -> bool:
    try:
        find_inception_weights(path)
        return True
    except MissingWeightsError:
        return False


def choose_lpips(kind: str) -> tuple[nn.Module | None, str]:
    """LPIPS with local weights: ``auto`` uses VGG when present, else skips and says so."""
    if kind == "none":
        return None, "LPIPS not requested (--lpips none)"
    net = "vgg" if kind == "auto" else kind
    module, reason = load_lpips(net=net, required=kind != "auto")
    if module is None:
        return None, f"LPIPS skipped: {reason}"
    return module, f"LPIPS ({net})"
