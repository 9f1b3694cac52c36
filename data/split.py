"""What every in-memory DataModule shares: train/val splits as index views, and their loaders.

A modality's DataModule keeps its whole dataset as one tensor (uint8 images, float sequences) and
fills ``self._splits`` in ``setup()``; this base turns the splits into the loaders Lightning and the
commands use. A batch is gathered by index in one step (``__getitems__``) and converted by the
subclass's ``collate``; the unshuffled loaders used for tokenizing also carry ``"index"``: each
item's position in its split, so writers can place codes even when ranks interleave.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

SPLITS = ("train", "val")


class SplitDataset(Dataset):
    """A view of in-memory ``items`` (N, ...) through an index list; batches are fetched whole."""

    def __init__(self, items: torch.Tensor, labels: torch.Tensor | None, indices: torch.Tensor,
                 with_index: bool = False, source_indices: torch.Tensor | None = None) -> None:
        self.items, self.labels, self.indices, self.with_index = items, labels, indices, with_index
        # Positions in the original dataset (its file order), for reporting which items a split holds.
        self.source_indices = indices if source_indices is None else source_indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        pos = torch.as_tensor(positions, dtype=torch.long)
        idx = self.indices[pos]
        batch = {"x": self.items[idx]}
        if self.labels is not None:
            batch["label"] = self.labels[idx]
        if self.with_index:
            batch["index"] = pos
        return batch

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([position]).items()}

    def view(self, with_index: bool) -> SplitDataset:
        return SplitDataset(self.items, self.labels, self.indices, with_index, self.source_indices)


def stack_items(batch: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batches arrive whole from ``__getitems__``; a list of single items (no batching) is stacked."""
    if isinstance(batch, list):
        return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}
    return batch


def seeded_subset(indices: torch.Tensor, limit: int | None, seed: int) -> torch.Tensor:
    """A seeded random subset of ``limit`` indices, sorted so iteration follows the dataset order."""
    if limit is None or limit >= len(indices):
        return indices
    chosen = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:limit]]
    return chosen.sort().values


class SplitDataModule(pl.LightningDataModule):
    """Loaders over ``self._splits`` (filled by the subclass's ``setup()``) with the subclass's collate."""

    batch_size: int
    num_workers: int
    seed: int

    def __init__(self) -> None:
        super().__init__()
        self._splits: dict[str, SplitDataset] = {}

    def collate(self, augment: bool) -> Callable:
        """The batch conversion; ``augment`` is true only for training batches."""
        return stack_items

    def split_dataset(self, split: str, with_index: bool = False) -> SplitDataset:
        """The ``train`` or ``val`` split as a dataset (after ``setup()``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not self._splits:
            self.setup()
        return self._splits[split].view(with_index)

    def _loader(self, split: str, shuffle: bool, augment: bool, with_index: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.split_dataset(split, with_index=with_index), batch_size=self.batch_size, shuffle=shuffle,
            num_workers=self.num_workers, collate_fn=self.collate(augment), generator=generator,
            persistent_workers=self.num_workers > 0, drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, augment=True)

    def val_dataloader(self) -> DataLoader | list:
        if len(self.split_dataset("val")) == 0:
            return []  # no validation data: Lightning skips validation for an empty list
        return self._loader("val", shuffle=False, augment=False)

    def split_dataloader(self, split: str) -> DataLoader:
        """Unshuffled, unaugmented iteration over one split (for tokenizing); batches carry ``index``."""
        return self._loader(split, shuffle=False, augment=False, with_index=True)

    def predict_dataloader(self) -> list[DataLoader]:
        """``[train, val]`` unshuffled, in ``SPLITS`` order: ``dataloader_idx`` 0 is train, 1 is val."""
        return [self.split_dataloader(s) for s in SPLITS]
