"""The tokenizer contract and loading a tokenizer from its checkpoint alone."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from layers.instantiate import check_params, resolve_target

CHECKPOINT_KEY = "tokenforge"


class Tokenizer(pl.LightningModule):
    """Stage-one LightningModule: ``encode(x) -> codes``, ``decode(codes) -> x``, ``code_spec``.

    ``code_spec`` is a plain dict that stage two and the commands read: ``{"modality": name (see
    ``stage1/modalities/``), "layout": {"channels", "shape", ...}, "grid": [...], "depth": None|int,
    "codebook_size": int, "continuous_dim": None|int, "decoder_output": {"channels", "shape", "range"}}``.
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

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Tokenizing as Lightning prediction: a batch's codes, with its positions (and labels) passed on."""
        out = {"codes": self.encode(batch["x"]), "index": batch["index"]}
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.setdefault(CHECKPOINT_KEY, {})
        meta.update({"kind": self.kind, "target": f"{type(self).__module__}.{type(self).__qualname__}",
                     "code_spec": self.code_spec, "format_version": 1})


class CheckpointKindError(ValueError):
    """A checkpoint is not of the kind the caller needs (e.g. a prior where a tokenizer was expected)."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file cannot be read: truncated, not a torch file, or holding objects that
    ``weights_only=True`` refuses (a pickle payload)."""


def load_checkpoint_file(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one-line errors for every way a file can be bad.

    Pickled code is never run (``weights_only=True``); a file that tries is reported as refused.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {str(path)!r} is a directory; give the .ckpt file inside it "
                                "(e.g. checkpoints/last.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptCheckpointError(f"{path} was refused: it is not a plain weights file ({first}); "
                                     "nothing in it was run") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptCheckpointError(
            f"{path} is truncated or not a checkpoint ({type(err).__name__}: {first})") from err
    if not isinstance(ckpt, dict):
        raise CorruptCheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dictionary")
    return ckpt


def read_checkpoint(path: str | Path, expected_kind: str | None = None) -> dict[str, Any]:
    """Load a tokenforge checkpoint (weights only) with clear errors for a missing, corrupt or foreign one."""
    ckpt = load_checkpoint_file(path)
    meta = ckpt.get(CHECKPOINT_KEY)
    if not isinstance(meta, dict) or not isinstance(meta.get("target"), str):
        raise CheckpointKindError(f"{path} is not a tokenforge checkpoint (no '{CHECKPOINT_KEY}' metadata); "
                                  "train with scripts/train.py to make one")
    if expected_kind is not None and meta.get("kind") != expected_kind:
        raise CheckpointKindError(f"{path} holds a {meta.get('kind')!r} ({meta['target']}), but a "
                                  f"{expected_kind!r} checkpoint is needed here")
    return ckpt


def checkpoint_hparams(ckpt: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """The stored constructor arguments; a non-mapping is refused rather than splatted into a class."""
    hparams = ckpt.get("hyper_parameters", {})
    if not isinstance(hparams, Mapping) or not all(isinstance(k, str) for k in hparams):
        raise CorruptCheckpointError(f"{path}: 'hyper_parameters' is not a mapping of names to values")
    return dict(hparams)


def tokenizer_from_checkpoint(ckpt: Mapping[str, Any], path: str | Path,
                              map_location: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild a tokenizer from an already loaded checkpoint dict (see :func:`load_tokenizer`).

    The stored target must be a :class:`Tokenizer` subclass (checked before anything is built); the
    hyper-parameters are passed to its constructor, whose own sub-module specs go through the same
    class-and-base checks as a config.
    """
    target = ckpt[CHECKPOINT_KEY]["target"]
    cls = resolve_target(target, base=Tokenizer, where=f"{path}: stored tokenizer target")
    hparams = checkpoint_hparams(ckpt, path)
    for key in getattr(cls, "recorded_hparams", ()):
        hparams.pop(key, None)
    check_params(cls, hparams, f"{path}: stored hyper-parameters")
    model = cls(**hparams)
    model.load_state_dict(ckpt["state_dict"])
    if hasattr(model, "use_ema_weights"):
        model.use_ema_weights()
    return model.to(map_location).eval()


def load_tokenizer(path: str | Path, map_location: str | torch.device = "cpu") -> Tokenizer:
    """Rebuild a tokenizer from its checkpoint alone (hyper-parameters + weights), in eval mode."""
    return tokenizer_from_checkpoint(read_checkpoint(path, expected_kind="tokenizer"), path, map_location)
