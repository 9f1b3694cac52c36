"""Improved precision and recall (Kynkäänniemi et al., 2019) on feature vectors.

Each set's manifold is approximated by balls around its points whose radius is the distance to
the point's k-th nearest neighbour in the same set (k = 3 in the paper). Precision is the
fraction of generated samples inside the real manifold (fidelity); recall is the fraction of
real samples inside the generated manifold (coverage). Distances are computed in row chunks
with ``torch.cdist`` so memory stays ``chunk x N`` rather than ``N x N``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def knn_radii(features: Tensor, k: int = 3, chunk_size: int = 1024) -> Tensor:
    """Distance from each row of ``features (N, D)`` to its k-th nearest other row, ``(N,)``."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} samples to estimate k-NN radii, got {n}")
    feats = features.float()
    radii = torch.empty(n, dtype=feats.dtype, device=feats.device)
    for start in range(0, n, chunk_size):
        d = torch.cdist(feats[start : start + chunk_size], feats)
        # The smallest distance of a row is to itself (0); the (k+1)-th smallest is the k-th neighbour.
        radii[start : start + chunk_size] = d.kthvalue(k + 1, dim=1).values
    return radii


def manifold_fraction(query: Tensor, ref: Tensor, ref_radii: Tensor, chunk_size: int = 1024) -> Tensor:
    """Fraction of ``query`` rows lying within ``ref_radii[j]`` of at least one ``ref[j]``."""
    ref = ref.float()
    inside = 0
    for start in range(0, query.shape[0], chunk_size):
        d = torch.cdist(query[start : start + chunk_size].float(), ref)
        inside += int((d <= ref_radii.unsqueeze(0)).any(dim=1).sum())
    return torch.tensor(inside / max(query.shape[0], 1))


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk_size: int = 1024) -> dict[str, Tensor]:
    """``{"precision", "recall"}`` of ``fake (M, D)`` against ``real (N, D)`` features."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    real_radii = knn_radii(real, k, chunk_size)
    fake_radii = knn_radii(fake, k, chunk_size)
    return {
        "precision": manifold_fraction(fake, real, real_radii, chunk_size),
        "recall": manifold_fraction(real, fake, fake_radii, chunk_size),
    }


class PrecisionRecall(Metric):
    """Precision/recall over a feature extractor (e.g. ``DomainFeatures`` or Inception pool features).

    ``update(images, real=...)`` stores features (``cat``-gathered across ranks: memory grows with
    the number of samples, use a few thousand); ``compute()`` returns ``{"precision", "recall"}``.
    ``extractor=None`` means the inputs already are ``(B, D)`` features.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, extractor: nn.Module | None = None, k: int = 3, chunk_size: int = 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        self.extractor = extractor
        self.k, self.chunk_size = k, chunk_size
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    def update(self, inputs: Tensor, real: bool) -> None:
        with torch.no_grad():
            feats = inputs if self.extractor is None else self.extractor(inputs)
        feats = feats.detach().float().flatten(1)
        (self.real_features if real else self.fake_features).append(feats)

    def compute(self) -> dict[str, Tensor]:
        return precision_recall(
            dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features), self.k, self.chunk_size
        )
