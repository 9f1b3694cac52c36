"""Checkpoints written beside their target and renamed into place.

Lightning's default writer stages the file through fsspec's transaction, i.e. a temporary file in
``$TMPDIR``, then moves it: across filesystems that move is a copy, so a crash mid-copy leaves a
truncated ``last.ckpt``, and nothing is fsync'd. Here the temporary file lies in the checkpoint's own
folder, is fsync'd, and is renamed over the target (atomic on POSIX), through ``data.atomic``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from data.atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are all-or-nothing on a local filesystem."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))
