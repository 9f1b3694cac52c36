"""``ImageDataModule``: the built-in image datasets and any image folder behind one LightningDataModule.

The whole dataset stays in memory as one uint8 tensor (N, C, H, W); a batch is gathered by index and
converted to float in one vectorised step (``__getitems__`` + a collate), which is far faster than
converting image by image and keeps worker processes optional. Batches are
``{"x": float (B, C, H, W) in [-1, 1], "label": long (B,)}`` (``label`` only when the data has labels);
the split views and loaders come from :class:`data.split.SplitDataModule`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from data.image_array import ImageArrayDataset, to_unit_range
from data.split import SPLITS, SplitDataModule, SplitDataset, seeded_subset

DATASETS = ("fashion_mnist", "emoji", "folder")
NATIVE_SIZE = {"fashion_mnist": 28, "emoji": 64, "folder": 64}
# ITU-R BT.601 luma weights, as PIL's convert("L") uses.
_LUMA = (0.299, 0.587, 0.114)


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize (N, C, H, W) uint8 to ``size``×``size`` with antialiased bicubic, in chunks to bound memory."""
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float32)
        y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[start:start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _to_grey_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 → (N, 1, H, W) uint8 luma."""
    w = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.to(torch.float32) * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)


class ToFloat:
    """Collate for ``SplitDataset`` batches: uint8 → [-1, 1], grey → RGB when asked, optional h-flip."""

    def __init__(self, channels: int, hflip: bool = False) -> None:
        self.channels, self.hflip = channels, hflip

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(batch, list):  # a sampler without batching handed single items
            batch = {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
        x = batch["x"]
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if self.hflip:
            flip = torch.rand(x.shape[0]) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = to_unit_range(x)
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1).contiguous()
        return {**batch, "x": x}


class ImageDataModule(SplitDataModule):
    """Images from ``fashion_mnist``, ``emoji`` or a ``folder``.

    ``root`` overrides a built-in dataset's file location, or names the image folder for ``folder``.
    ``size`` resizes (default: 28 for fashion_mnist, 64 otherwise); ``channels`` is 1 or 3 (default: the
    data's own). fashion_mnist validates on its official test split; the others hold out ``val_fraction``
    by a permutation seeded with ``seed``. ``limit_train``/``limit_val`` keep a seeded random subset
    (sorted, so iteration order follows the dataset) for smoke tests and benchmarks.
    """

    def __init__(
        self,
        dataset: str = "emoji",
        root: str | None = None,
        size: int | None = None,
        channels: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        seed: int = 0,
        limit_train: int | None = None,
        limit_val: int | None = None,
        hflip: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3 (or None for the data's own), got {channels}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if dataset == "folder" and root is None:
            raise ValueError(
                "dataset 'folder' needs root: the folder of images (data.params.root=/path/to/images)"
            )
        for name, value in (("limit_train", limit_train), ("limit_val", limit_val), ("size", size)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value}")
        self.save_hyperparameters()
        self.dataset, self.root, self.cache_dir = dataset, root, cache_dir
        self.size = int(size) if size is not None else NATIVE_SIZE[dataset]
        self.channels = channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.seed = val_fraction, seed
        self.limit_train, self.limit_val, self.hflip = limit_train, limit_val, hflip
        self.image_shape: tuple[int, int, int] | None = None
        self.num_classes: int | None = None
        self.classes: list[str] | None = None

    # -- loading ---------------------------------------------------------------------------------
    def _load(self) -> list[ImageArrayDataset]:
        if self.dataset == "fashion_mnist":
            from data.fashion_mnist import FashionMNIST

            return [FashionMNIST(self.root, "train"), FashionMNIST(self.root, "test")]
        if self.dataset == "emoji":
            from data.emoji import Emoji

            return [Emoji(self.root, size=self.size, cache_dir=self.cache_dir)]
        from data.image_folder import ImageFolder

        return [ImageFolder(self.root, size=self.size)]

    def _prepare(self, ds: ImageArrayDataset, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The images at ``used`` (sorted indices) as (n, C, size, size) uint8, plus their labels.

        Only the images a split actually uses are converted, so ``limit_train=64`` on a resized
        Fashion-MNIST resizes 64 images, not 70k.
        """
        full = len(used) == len(ds)
        picked = ds.images if full else ds.images[used.numpy()]
        images = torch.from_numpy(picked).permute(0, 3, 1, 2).contiguous()
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = _resize_uint8(images, self.size)
        if self.channels == 1 and images.shape[1] == 3:
            images = _to_grey_uint8(images)
        labels = None
        if ds.labels is not None:
            labels = torch.from_numpy(ds.labels if full else ds.labels[used.numpy()]).long()
        return images, labels

    def _subset(self, indices: torch.Tensor, limit: int | None, salt: int) -> torch.Tensor:
        return seeded_subset(indices, limit, self.seed * 1_000_003 + salt)

    def _split_indices(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted (train, val) indices of a dataset without an official split, by a seeded permutation."""
        n_val = round(n * self.val_fraction)
        if self.val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return perm[n_val:].sort().values, perm[:n_val].sort().values

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        datasets = self._load()
        if len(datasets) == 2:  # an official split: train + test (used as val)
            sources = {"train": datasets[0], "val": datasets[1]}
            indices = {"train": torch.arange(len(datasets[0])), "val": torch.arange(len(datasets[1]))}
        else:
            sources = {"train": datasets[0], "val": datasets[0]}
            train_idx, val_idx = self._split_indices(len(datasets[0]))
            indices = {"train": train_idx, "val": val_idx}
        indices["train"] = self._subset(indices["train"], self.limit_train, salt=1)
        indices["val"] = self._subset(indices["val"], self.limit_val, salt=2)

        # Convert each source once, restricted to the images some split uses; re-point indices at them.
        prepared: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        for ds in sources.values():
            if id(ds) not in prepared:
                used = torch.cat([indices[s] for s in SPLITS if sources[s] is ds]).unique(sorted=True)
                prepared[id(ds)] = (*self._prepare(ds, used), used)
        self._splits = {}
        for split, ds in sources.items():
            images, labels, used = prepared[id(ds)]
            local = torch.searchsorted(used, indices[split])
            self._splits[split] = SplitDataset(images, labels, local, source_indices=indices[split])
        self.image_shape = (self.channels or self._splits["train"].items.shape[1], self.size, self.size)
        self.num_classes = datasets[0].num_classes
        self.classes = datasets[0].classes

    # -- loaders ---------------------------------------------------------------------------------
    def collate(self, augment: bool) -> Callable:
        return ToFloat(self.image_shape[0], hflip=augment and self.hflip)
