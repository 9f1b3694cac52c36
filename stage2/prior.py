"""The shared base of stage-two priors: code-spec resolution, optimizer, checkpoint identity, loading.

A prior trains on a code-file folder (``codes=``) or on an explicit ``code_spec``. When only the
folder is given, its ``manifest.json`` supplies the code spec, the number of classes and the
tokenizer checkpoint; the RESOLVED values are written back into the hyper-parameters, so the
checkpoint alone rebuilds the model (``load_prior(path)``) without the code folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from layers.instantiate import ConfigError, resolve_target
from stage1.tokenizer import CHECKPOINT_KEY, read_checkpoint


def plain(value: Any) -> Any:
    """Deep-convert mappings/sequences (e.g. OmegaConf containers) to dicts/lists a
    ``weights_only=True`` checkpoint can hold; tuples stay tuples."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def _num_classes_from_labels(folder: Path, manifest: Mapping[str, Any]) -> int | None:
    """Number of classes from the manifest, or (max label + 1) over the label arrays of the folder."""
    for source in (manifest, manifest.get("labels") or {}):
        if isinstance(source, Mapping) and source.get("num_classes") is not None:
            return int(source["num_classes"])
    files = sorted(p for p in folder.rglob("*.npy") if "label" in p.name)
    if not files:
        return None
    top = max(int(np.load(p, mmap_mode="r").max(initial=-1)) for p in files)
    return top + 1 if top >= 0 else None


def resolve_code_spec(
    codes: str | None,
    code_spec: Mapping[str, Any] | None,
    num_classes: int | None,
    tokenizer_path: str | None,
) -> tuple[dict[str, Any], int | None, str | None]:
    """Fill ``code_spec``, ``num_classes`` and ``tokenizer_path`` from ``codes/manifest.json`` when missing.

    Explicit arguments win. ``num_classes = 0`` asks for an unconditional prior even on labelled
    codes and resolves to ``None``. The manifest is only read when ``code_spec`` is not given, so a
    model rebuilt from its checkpoint never touches the (possibly absent) code folder.
    """
    if code_spec is None:
        if codes is None:
            raise ConfigError("a prior needs either codes (a code-file folder) or code_spec")
        folder = Path(codes)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{manifest_path} not found: codes must be a folder written by `tokenforge tokenize` "
                "(or pass code_spec explicitly)"
            )
        manifest = json.loads(manifest_path.read_text())
        if "code_spec" not in manifest:
            raise ConfigError(f"{manifest_path} has no 'code_spec'")
        code_spec = manifest["code_spec"]
        if num_classes is None:
            num_classes = _num_classes_from_labels(folder, manifest)
        if tokenizer_path is None:
            tok = manifest.get("tokenizer") or {}
            tokenizer_path = tok.get("path") if isinstance(tok, Mapping) else tok
    spec = plain(code_spec)
    missing = {"grid", "codebook_size"} - set(spec)
    if missing:
        raise ConfigError(f"code_spec lacks {sorted(missing)}: got {spec}")
    if spec.get("continuous_dim") and not spec.get("codebook_size"):
        raise ConfigError("this prior models discrete codes; the code spec is continuous (GIVT-style)")
    spec.setdefault("depth", None)
    spec["grid"] = [int(g) for g in spec["grid"]]
    num_classes = int(num_classes) if num_classes else None
    return spec, num_classes, (str(tokenizer_path) if tokenizer_path else None)


class Prior(pl.LightningModule):
    """Base LightningModule of priors.

    A subclass calls ``self.save_hyperparameters()`` and then :meth:`setup_codes` in its
    ``__init__``, accepts the optimizer keywords (``lr``, ``weight_decay``, ``betas``,
    ``warmup_steps``, ``max_steps``, ``min_lr_ratio``) and implements ``sample(n, cond=None, ...)``.
    """

    kind = "prior"

    def setup_codes(
        self,
        codes: str | None,
        code_spec: Mapping[str, Any] | None,
        num_classes: int | None,
        tokenizer_path: str | None,
    ) -> None:
        """Resolve the code spec, store the resolved values in ``hparams`` and derive the sizes."""
        spec, num_classes, tokenizer_path = resolve_code_spec(codes, code_spec, num_classes, tokenizer_path)
        for key in list(self.hparams.keys()):
            self.hparams[key] = plain(self.hparams[key])
        self.hparams["code_spec"] = spec
        self.hparams["num_classes"] = num_classes
        self.hparams["tokenizer_path"] = tokenizer_path
        self.code_spec = spec
        self.num_classes = num_classes
        self.tokenizer_path = tokenizer_path
        self.grid = tuple(spec["grid"])
        self.code_depth: int | None = spec["depth"]
        self.codebook_size = int(spec["codebook_size"])
        self.seq_len = math.prod(self.grid) * (self.code_depth or 1)

    # --- shapes -------------------------------------------------------------------------------
    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one sample's codes: ``(*grid)`` or ``(*grid, depth)``."""
        return self.grid + ((self.code_depth,) if self.code_depth else ())

    def flatten_codes(self, codes: Tensor) -> Tensor:
        """``(B, *grid[, depth]) -> (B, N)``: row-major over the grid, depth-minor."""
        if tuple(codes.shape[1:]) != self.code_shape:
            want = (-1, *self.code_shape)
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not match the code spec {want}")
        return codes.reshape(codes.shape[0], -1).long()

    def unflatten_codes(self, flat: Tensor) -> Tensor:
        return flat.reshape(flat.shape[0], *self.code_shape)

    def batch_labels(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        """The batch's labels for a class-conditional prior, else ``None`` (labels are ignored)."""
        if self.num_classes is None:
            return None
        if "label" not in batch:
            raise ValueError(
                "a class-conditional prior needs batch['label']; set num_classes: 0 to train unconditionally"
            )
        return batch["label"].long()

    def cond_tensor(self, n: int, cond: int | Sequence[int] | Tensor | None) -> Tensor | None:
        """Normalise ``cond`` (None, one class, or n classes) to a LongTensor ``(n,)`` on the model device."""
        if cond is None:
            return None
        if self.num_classes is None:
            raise ValueError("this prior is unconditional (num_classes is None); sample with cond=None")
        labels = torch.as_tensor(cond, dtype=torch.long, device=self.device)
        if labels.dim() == 0:
            labels = labels.expand(n)
        if labels.shape != (n,):
            raise ValueError(f"cond must be one class or {n} classes, got shape {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class labels must lie in [0, {self.num_classes}), got {labels.tolist()}")
        return labels.clone()

    # --- logging --------------------------------------------------------------------------------
    def log_aux(self, aux: Mapping[str, Tensor], stage: str, batch_size: int) -> None:
        """Log the transformer's auxiliary loss and per-layer statistics (e.g. MoE load) when present."""
        stats = {k: v for k, v in aux.items() if k != "aux_loss"}
        if not stats:  # a plain MLP transformer: nothing to log
            return
        self.log(f"{stage}/aux_loss", aux["aux_loss"].detach(), batch_size=batch_size)
        for key, value in stats.items():
            value = value.detach().float()
            if value.numel() == 1:
                self.log(f"{stage}/{key}", value.reshape(()), batch_size=batch_size)
            else:  # a per-expert vector: its extremes say whether the load is balanced
                self.log(f"{stage}/{key}_max", value.max(), batch_size=batch_size)
                self.log(f"{stage}/{key}_min", value.min(), batch_size=batch_size)

    # --- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """AdamW (decay on matrices only) with linear warmup then cosine decay to ``min_lr_ratio * lr``.

        The cosine horizon is ``max_steps`` when set, else the trainer's estimated stepping batches.
        """
        hp = self.hparams
        lr = float(hp.get("lr", 3e-4))
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(hp.get("weight_decay", 0.05))},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=lr,
            betas=tuple(hp.get("betas", (0.9, 0.95))),
        )
        warmup = int(hp.get("warmup_steps", 0))
        total = hp.get("max_steps")
        if total is None:
            est = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
            total = int(est) if math.isfinite(est) else None
        min_ratio = float(hp.get("min_lr_ratio", 0.1))

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if not total or total <= warmup:
                return 1.0
            progress = min(1.0, (step - warmup) / (total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- sampling and checkpoints -------------------------------------------------------------------
    def sample(self, n: int, cond: Any = None, **sampling: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.setdefault(CHECKPOINT_KEY, {})
        meta.update({"kind": self.kind, "target": f"{type(self).__module__}.{type(self).__qualname__}",
                     "code_spec": self.code_spec, "tokenizer_path": self.tokenizer_path, "format_version": 1})


def load_prior(path: str | Path, map_location: str | torch.device = "cpu") -> Prior:
    """Rebuild a prior from its checkpoint alone (``weights_only=True``), in eval mode.

    Refuses checkpoints of another kind (e.g. a tokenizer) with a message saying what it holds.
    """
    ckpt = read_checkpoint(path, expected_kind="prior")
    cls = resolve_target(ckpt[CHECKPOINT_KEY]["target"])
    if not (isinstance(cls, type) and issubclass(cls, Prior)):
        raise ConfigError(f"{path}: target {ckpt[CHECKPOINT_KEY]['target']} is not a stage2 Prior")
    model = cls(**dict(ckpt.get("hyper_parameters", {})))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location).eval()
