"""The tokenizer contract and loading a tokenizer from its checkpoint alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from layers.instantiate import resolve_target

CHECKPOINT_KEY = "tokenforge"


class Tokenizer(pl.LightningModule):
    """Stage-one LightningModule: ``encode(x) -> codes``, ``decode(codes) -> x``, ``code_spec``.

    ``code_spec`` is a plain dict ``{"grid": [...], "depth": None|int, "codebook_size": int,
    "continuous_dim": None|int}`` that stage two reads to size its embeddings.
    """

    kind = "tokenizer"
    # Hyper-parameters recorded during training (facts, not constructor inputs).
    recorded_hparams: tuple[str, ...] = ()

    @property
    def code_spec(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.setdefault(CHECKPOINT_KEY, {})
        meta.update({"kind": self.kind, "target": f"{type(self).__module__}.{type(self).__qualname__}",
                     "code_spec": self.code_spec, "format_version": 1})


class CheckpointKindError(ValueError):
    """A checkpoint is not of the kind the caller needs (e.g. a prior where a tokenizer was expected)."""


def read_checkpoint(path: str | Path, expected_kind: str | None = None) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with clear errors for a missing or foreign checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not meta or "target" not in meta:
        raise CheckpointKindError(f"{path} is not a tokenforge checkpoint (no '{CHECKPOINT_KEY}' metadata); "
                                  "train with scripts/train.py to make one")
    if expected_kind is not None and meta.get("kind") != expected_kind:
        raise CheckpointKindError(f"{path} holds a {meta.get('kind')!r} ({meta['target']}), but a "
                                  f"{expected_kind!r} checkpoint is needed here")
    return ckpt


def load_tokenizer(path: str | Path, map_location: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild a tokenizer from its checkpoint alone (hyper-parameters + weights), in eval mode."""
    ckpt = read_checkpoint(path, expected_kind="tokenizer")
    cls = resolve_target(ckpt[CHECKPOINT_KEY]["target"])
    hparams = dict(ckpt.get("hyper_parameters", {}))
    for key in getattr(cls, "recorded_hparams", ()):
        hparams.pop(key, None)
    model = cls(**hparams)
    model.load_state_dict(ckpt["state_dict"])
    if hasattr(model, "use_ema_weights"):
        model.use_ema_weights()
    return model.to(map_location).eval()
