"""One loader for every checkpoint a command is given: open it once, tell its kind, restore it.

``open_run(path)`` reads the file once with ``torch.load(weights_only=True)``, reads its kind from the
metadata under :data:`CHECKPOINT_KEY`, and rebuilds the model after checking that the stored class
is a ``Tokenizer`` or a ``Prior`` (the same class-and-base checks a config gets, see SECURITY.md).
For a prior it also restores the tokenizer it was trained on and checks the two code specs agree.

Where a prior's tokenizer comes from is never taken on trust: ``--tokenizer`` wins; otherwise the
path recorded in the prior is resolved relative to the prior's checkpoint folder (a relative path
from an older checkpoint falls back to the working directory), printed, and its SHA-256 checked
against the recorded one when there is one. ``sample``, ``evaluate`` and ``tokenize`` all go through
here; none imports another command.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from data.codes import sha256_file
from layers.instantiate import instantiate
from stage1.tokenizer import (
    CHECKPOINT_KEY,
    CheckpointKindError,
    Tokenizer,
    read_checkpoint,
    tokenizer_from_checkpoint,
)
from tokenforge.config import merge_overrides, section_bases, to_plain

KINDS = ("tokenizer", "prior")
# Data-module parameters that name a folder the data module WRITES to. A stranger's checkpoint must
# not choose where this machine writes, so the stored value is dropped (the user's default cache is
# used) unless the user sets it again on the command line.
WRITABLE_DATA_PARAMS = ("cache_dir",)
# Code-spec fields a prior and its tokenizer must agree on.
SPEC_FIELDS = ("codebook_size", "grid", "depth", "continuous_dim", "levels", "modality")


class TokenizerMismatchError(ValueError):
    """The tokenizer found for a prior is not the one it was trained on (hash or code spec differ)."""


@dataclass
class Run:
    """A restored checkpoint: the model, its kind and code spec, and (for a prior) its tokenizer."""

    path: Path
    kind: str
    checkpoint: dict[str, Any] = field(repr=False)
    model: Any = field(repr=False)
    tokenizer: Any = field(default=None, repr=False)
    tokenizer_path: Path | None = None
    tokenizer_checkpoint: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        return self.checkpoint[CHECKPOINT_KEY]["target"]

    @property
    def code_spec(self) -> dict[str, Any]:
        return dict(self.model.code_spec)

    @property
    def config(self) -> dict[str, Any] | None:
        """The resolved config the run was trained with (stored by the train command), if any."""
        config = self.checkpoint[CHECKPOINT_KEY].get("config")
        return config if isinstance(config, dict) else None

    def data_config(self) -> dict[str, Any]:
        """The data spec the tokenizer was trained on (for a prior: its tokenizer's)."""
        source = self.checkpoint if self.kind == "tokenizer" else self.tokenizer_checkpoint
        config = ((source or {}).get(CHECKPOINT_KEY) or {}).get("config")
        if not isinstance(config, Mapping) or not isinstance(config.get("data"), Mapping):
            raise ValueError(f"{self.path}: the tokenizer checkpoint stores no data config; pass a checkpoint "
                             "written by scripts/train.py")
        return to_plain(config["data"])

    def datamodule(self, overrides: Sequence[str] = (), batch_size: int | None = None) -> Any:
        """The DataModule the tokenizer was trained on, with ``data.params.*`` overrides applied.

        The stored spec goes through the same checks as a config (a ``LightningDataModule`` class, known
        parameters); folders it would write to are not taken from the checkpoint.
        """
        spec = self.data_config()
        params = dict(spec.get("params") or {})
        user_keys = {o.split("=", 1)[0].strip() for o in overrides}
        for name in WRITABLE_DATA_PARAMS:
            if name in params and f"data.params.{name}" not in user_keys:
                params.pop(name)
        spec = {**spec, "params": params}
        merged = to_plain(merge_overrides(OmegaConf.create({"data": spec}), list(overrides)))["data"]
        params = merged.setdefault("params", {})
        if batch_size is not None and "batch_size" in params:
            params["batch_size"] = batch_size
        return instantiate(merged, where=f"{self.path}: stored data config", base=section_bases()["data"])


def checkpoint_kind(ckpt: Mapping[str, Any], path: str | Path) -> str:
    kind = ckpt[CHECKPOINT_KEY].get("kind")
    if kind not in KINDS:
        raise CheckpointKindError(f"{path} holds a {kind!r}; tokenforge commands take {' or '.join(KINDS)} "
                                  "checkpoints")
    return kind


def open_run(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, expect: str | None = None,
             tokenizer: str | os.PathLike | None = None, with_tokenizer: bool = True,
             log: Callable[[str], Any] = print) -> Run:
    """Open ``path`` once and restore what it holds (see the module docstring).

    ``expect`` refuses other kinds; ``tokenizer`` overrides a prior's recorded tokenizer;
    ``with_tokenizer=False`` skips loading it (e.g. to read a prior's sampling options only).
    """
    path = Path(path)
    ckpt = read_checkpoint(path, expected_kind=expect)
    kind = checkpoint_kind(ckpt, path)
    if kind == "tokenizer":
        model = tokenizer_from_checkpoint(ckpt, path, map_location)
        return Run(path, kind, ckpt, model, tokenizer=model, tokenizer_path=path, tokenizer_checkpoint=ckpt)
    from stage2.prior import prior_from_checkpoint

    model = prior_from_checkpoint(ckpt, path, map_location)
    run = Run(path, kind, ckpt, model)
    if with_tokenizer:
        tok_path, expected_sha = find_prior_tokenizer(ckpt, model, path, tokenizer, log)
        tok_ckpt = read_checkpoint(tok_path, expected_kind="tokenizer")
        if expected_sha and sha256_file(tok_path) != expected_sha:
            raise TokenizerMismatchError(
                f"{tok_path} is not the tokenizer {path} was trained on (its SHA-256 differs from the recorded "
                f"{expected_sha[:12]}...); pass --tokenizer with the right checkpoint")
        run.tokenizer = tokenizer_from_checkpoint(tok_ckpt, tok_path, map_location)
        run.tokenizer_path, run.tokenizer_checkpoint = tok_path, tok_ckpt
        check_code_specs(run.tokenizer.code_spec, model.code_spec, tok_path, path)
    return run


def recorded_tokenizer(ckpt: Mapping[str, Any], model: Any) -> tuple[str | None, str | None, bool]:
    """(path, sha256, relative_to_checkpoint) of the tokenizer a prior checkpoint records.

    The train command stores ``{"path": relative to the checkpoint's folder, "sha256"}``; older
    checkpoints only have the prior's ``tokenizer_path`` hyper-parameter (as given at training time).
    """
    meta = ckpt[CHECKPOINT_KEY]
    rec = meta.get("tokenizer")
    if isinstance(rec, Mapping) and isinstance(rec.get("path"), str):
        sha = rec.get("sha256")
        return rec["path"], sha if isinstance(sha, str) else None, True
    legacy = getattr(model, "tokenizer_path", None) or meta.get("tokenizer_path")
    return (legacy if isinstance(legacy, str) else None), None, False


def find_prior_tokenizer(ckpt: Mapping[str, Any], model: Any, path: Path, override: str | os.PathLike | None,
                         log: Callable[[str], Any] = print) -> tuple[Path, str | None]:
    """The tokenizer checkpoint to decode a prior's codes with, and the SHA-256 it must have (if known)."""
    recorded, sha, ckpt_relative = recorded_tokenizer(ckpt, model)
    if override is not None:
        log(f"tokenizer: {override} (from --tokenizer)")
        return Path(override), None
    if not recorded:
        raise FileNotFoundError(f"{path} records no tokenizer; pass --tokenizer PATH")
    candidate, where = Path(recorded), "as recorded"
    if not candidate.is_absolute():
        beside = path.parent / candidate
        if ckpt_relative or beside.is_file():
            candidate, where = beside, "beside the checkpoint"
        else:  # an older checkpoint recorded the path relative to the training's working directory
            where = "relative to the working directory"
    if not candidate.is_file():
        raise FileNotFoundError(f"the tokenizer recorded in {path} ({recorded!r}, looked for {candidate}) does not "
                                "exist here; pass --tokenizer PATH")
    how = "SHA-256 checked" if sha else "no recorded hash to check"
    log(f"tokenizer: {candidate} (recorded in {path.name}, found {where}; {how})")
    return candidate, sha


def check_code_specs(tok_spec: Mapping[str, Any], prior_spec: Mapping[str, Any], tok_path: Path,
                     prior_path: Path) -> None:
    """Refuse a tokenizer whose codes differ from the ones the prior models."""
    def norm(v: Any) -> Any:
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v

    for key in SPEC_FIELDS:
        if key in tok_spec and key in prior_spec and norm(tok_spec[key]) != norm(prior_spec[key]):
            raise TokenizerMismatchError(
                f"tokenizer {tok_path} has code spec {dict(tok_spec)}, but the prior {prior_path} was trained on "
                f"{dict(prior_spec)} ({key} differs); pass --tokenizer with the right checkpoint")


def relative_tokenizer_record(tokenizer_path: str | os.PathLike | None, sha256: str | None,
                              checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
    """What the train command stores for a prior: its tokenizer's path relative to the checkpoint folder."""
    if not tokenizer_path:
        return None
    tok = Path(tokenizer_path)
    if not tok.is_file():
        return None
    rel = os.path.relpath(tok.resolve(), Path(checkpoint_dir).resolve())
    return {"path": rel, "sha256": sha256}


__all__ = ["CHECKPOINT_KEY", "Run", "open_run", "TokenizerMismatchError", "Tokenizer", "relative_tokenizer_record"]
