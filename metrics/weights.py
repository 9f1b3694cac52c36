"""Locating pretrained weight files offline.

Nothing in tokenforge downloads weights. A metric or loss that needs a pretrained network
looks for the file under the name torch would cache it as, in a folder the user configured
and then in ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``), and when
it is absent says exactly which file to put where.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file is not on disk; the message names the file, the folder and its source."""


def hub_checkpoints_dir() -> Path:
    """The folder torch.hub caches weights in (follows ``torch.hub.set_dir`` and ``$TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def candidate_dirs(weights_dir: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched, in order: the configured ``weights_dir`` (if any), then the torch hub cache."""
    dirs = [Path(weights_dir).expanduser()] if weights_dir is not None else []
    dirs.append(hub_checkpoints_dir())
    return dirs


def find_weights(filenames: str | list[str], weights_dir: str | os.PathLike | None = None) -> Path | None:
    """First existing ``dir/name`` over :func:`candidate_dirs` and ``filenames``; ``None`` if none exists."""
    names = [filenames] if isinstance(filenames, str) else list(filenames)
    for folder in candidate_dirs(weights_dir):
        for name in names:
            path = folder / name
            if path.is_file():
                return path
    return None


def missing_message(what: str, filename: str, url: str, weights_dir: str | os.PathLike | None = None) -> str:
    """The one-paragraph explanation used by every missing-weights error and warning."""
    target = candidate_dirs(weights_dir)[0]
    searched = ", ".join(str(d) for d in candidate_dirs(weights_dir))
    return (
        f"{what} needs the pretrained weight file '{filename}', which was not found (searched: {searched}). "
        f"This machine cannot download it: fetch {url} elsewhere and put it at {target / filename}."
    )
