"""A dataset of images held whole in memory as one uint8 array.

Every image dataset here (built-in or a user's folder) ends up as ``images`` (N, H, W, C) uint8 plus
optional ``labels`` (N,) int64. uint8 keeps 70k Fashion-MNIST images in 55 MB and lets the
DataModule convert to float a whole batch at a time instead of image by image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [-1, 1], the range every tokenizer in this project expects."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


class ImageArrayDataset(Dataset):
    """``images`` (N, H, W, C) uint8, optional ``labels`` (N,) int64 and class names.

    Subclasses fill the arrays in ``__init__``; indexing gives ``{"x": (C, H, W) float in [-1, 1],
    "label": long}`` so the dataset is usable on its own, while the DataModule reads the arrays directly.
    """

    images: np.ndarray
    labels: np.ndarray | None = None
    classes: Sequence[str] | None = None

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
                 classes: Sequence[str] | None = None) -> None:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(labels)} labels for {len(images)} images")
        self.images = images
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.classes = None if classes is None else list(classes)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int | None:
        if self.labels is None:
            return None
        return len(self.classes) if self.classes is not None else int(self.labels.max()) + 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"x": to_unit_range(torch.from_numpy(self.images[i]).permute(2, 0, 1))}
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[i], dtype=torch.long)
        return item
