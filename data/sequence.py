"""1-D sequences: the built-in ``sines`` dataset (class-dependent sums of sinusoids) or a user's ``.npz``.

``sines`` is generated on the fly from a seed (a few thousand curves take milliseconds, so there is
nothing worth caching): class ``k`` of ``num_classes`` has a fundamental of ``2 + 3k`` cycles per
window (jittered by ±5%) with a random phase and amplitude, plus its second harmonic at a smaller
random amplitude and a little Gaussian noise, scaled into [-1, 1]. A tokenizer has to keep the
frequency to keep the class, which makes class-conditional priors and their evaluation meaningful.

Batches are ``{"x": float (B, C, L) in [-1, 1], "label": long (B,)}``; the split views and loaders
come from :class:`data.split.SplitDataModule`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.split import SplitDataModule, SplitDataset, seeded_subset

DATASETS = ("sines", "npz")


def sine_mixtures(n: int, length: int, num_classes: int, channels: int = 1, seed: int = 0,
                  noise: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
    """``n`` curves ``(n, channels, length)`` float32 in [-1, 1] and their classes ``(n,)`` int64.

    Every channel of a curve shares its class's frequencies but has its own phases, so
    multi-channel data stays learnable without being ``channels`` copies of one signal.
    """
    if num_classes < 1 or length < 8:
        raise ValueError(f"sines needs num_classes >= 1 and length >= 8, got {num_classes}, {length}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % num_classes
    rng.shuffle(labels)
    t = np.arange(length, dtype=np.float64) / length  # one window = time 0..1
    fundamental = (2.0 + 3.0 * labels) * rng.uniform(0.95, 1.05, n)
    a1 = rng.uniform(0.5, 0.8, (n, channels, 1))
    a2 = rng.uniform(0.1, 0.3, (n, channels, 1))
    phase = rng.uniform(0.0, 2 * np.pi, (n, channels, 2, 1))
    f = fundamental[:, None, None]
    x = (a1 * np.sin(2 * np.pi * f * t + phase[:, :, 0]) + a2 * np.sin(4 * np.pi * f * t + phase[:, :, 1])
         + noise * rng.standard_normal((n, channels, length)))
    return np.clip(x / 1.15, -1.0, 1.0).astype(np.float32), labels


def _load_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A user's sequences: ``x`` (N, C, L) or (N, L) floats in [-1, 1], optional int ``labels`` (N,)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"sequence file {path!r} does not exist (dataset 'npz' needs data.params.path: "
                                "a .npz with an array 'x' of shape (N, C, L) and optionally 'labels')")
    with np.load(path, allow_pickle=False) as f:
        if "x" not in f:
            raise ValueError(f"{path} has no array 'x' (it has {sorted(f.files)})")
        x = np.asarray(f["x"], dtype=np.float32)
        labels = np.asarray(f["labels"], dtype=np.int64) if "labels" in f else None
    x = x[:, None] if x.ndim == 2 else x
    if x.ndim != 3:
        raise ValueError(f"{path}: 'x' must be (N, C, L) or (N, L), got {x.shape}")
    return x, labels


class SequenceDataModule(SplitDataModule):
    """1-D sequences for the ``sequence`` modality.

    ``sines``: ``num_train`` + ``num_val`` generated curves of ``length`` samples, ``channels``
    channels and ``num_classes`` classes (train and val come from different seeds). ``npz``: the
    arrays in ``path``, of which ``val_fraction`` is held out by a seeded permutation.
    ``limit_train``/``limit_val`` keep a seeded random subset, as the image DataModule does.
    """

    def __init__(self, dataset: str = "sines", path: str | None = None, length: int = 128, channels: int = 1,
                 num_classes: int = 4, num_train: int = 4096, num_val: int = 512, val_fraction: float = 0.1,
                 batch_size: int = 64, num_workers: int = 0, seed: int = 0, limit_train: int | None = None,
                 limit_val: int | None = None) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        self.save_hyperparameters()
        self.dataset, self.path, self.length, self.channels = dataset, path, length, channels
        self.num_classes: int | None = num_classes if dataset == "sines" else None
        self.num_train, self.num_val, self.val_fraction = num_train, num_val, val_fraction
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.limits = {"train": limit_train, "val": limit_val}

    def _arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        if self.dataset == "sines":
            return {split: sine_mixtures(n, self.length, self.num_classes, self.channels, seed=self.seed * 2 + i)
                    for i, (split, n) in enumerate((("train", self.num_train), ("val", self.num_val)))}
        x, labels = _load_npz(self.path)
        perm = np.random.default_rng(self.seed).permutation(len(x))
        n_val = min(max(round(len(x) * self.val_fraction), 1), len(x) - 1) if self.val_fraction > 0 else 0
        parts = {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val])}
        self.num_classes = int(labels.max()) + 1 if labels is not None and len(labels) else None
        return {s: (x[i], None if labels is None else labels[i]) for s, i in parts.items()}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        for salt, (split, (x, labels)) in enumerate(self._arrays().items(), start=1):
            keep = seeded_subset(torch.arange(len(x)), self.limits[split], self.seed * 1_000_003 + salt)
            self._splits[split] = SplitDataset(torch.from_numpy(x), None if labels is None else
                                               torch.from_numpy(labels), keep)
        self.channels, self.length = (int(d) for d in self._splits["train"].items.shape[1:])
