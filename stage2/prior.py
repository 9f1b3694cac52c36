"""The one base of stage-two priors (:class:`Prior`) and the loader of prior checkpoints.

How to write a new prior (one file in ``stage2/`` plus one config):

1. ``class MyPrior(Prior)`` with a class attribute ``sampling_options`` (a tuple of
   :class:`stage2.options.SamplingOption`; reuse ``TOKEN_SAMPLING`` for temperature/top-k/top-p/cfg).
   ``sample`` must accept those names; ``tokenforge sample`` and ``evaluate`` build their flags from them.
   A prior of continuous latents (GIVT) sets ``code_kinds = frozenset({"continuous"})``; a prior that
   reads a conditioning code grid (VQ-VAE-2's bottom prior, an upsampler) sets ``accepts_context = True``.
2. ``__init__(self, <network arguments>, **prior)`` calls ``super().__init__(**prior)`` FIRST (it saves
   every argument of the chain as hyper-parameters and resolves the codes), then builds the network from
   ``self.layout`` / ``self.seq_len`` / ``self.codebook_size`` with the shared pieces
   ``self.code_embedding(dim, extra_tokens=...)`` and ``self.class_embedding(dim)``. The base arguments
   (``codes``, ``code_spec``, ``num_classes``, ``tokenizer``, ``level``, ``context_level``,
   ``cond_drop_prob``, ``lr``, ``weight_decay``, ``betas``, ``warmup_steps``, ``max_steps``,
   ``min_lr_ratio``, ``class_names``: the code folder's, so ``sample --class`` takes names) are merged
   into the subclass's signature, so configs are checked against both.
3. ``loss(codes, labels, context=None, generator=None) -> PriorLoss``: ``codes`` as the code spec
   shapes them, ``labels`` already label-dropped (the null class where dropped) during training,
   ``self.training`` tells training from validation, ``generator`` is fixed per validation batch (so
   random masks or noise repeat). Return the objective, the per-token NLL in nats (logged as
   ``val/loss`` and ``val/bits_per_token``), the network's aux dict (``aux_loss`` is added to the
   objective; MoE load is logged) and extra scalars to log.
4. ``sample(n, cond=None, *, generator=None, context=None, **options) -> codes (n, *code_shape)``;
   :meth:`guidance_labels` and :meth:`evaluating` cover the class/CFG and eval-mode bookkeeping.

The base does the rest: code spec resolution (code folder manifest, explicit spec, or a frozen
tokenizer), batches from code files or raw data encoded on the fly, label dropout, the optimiser
groups and schedule (:mod:`stage2.optim`), logging, checkpoint identity and :func:`load_prior`.

Data: ``codes=FOLDER`` reads the spec, the number of classes and the tokenizer path from the folder's
manifest (:func:`data.codes.code_folder_info`); ``tokenizer=CKPT`` instead trains on a raw dataset
(batches with ``"x"``) through that frozen tokenizer, encoded in eval mode without gradients (give
``num_classes`` explicitly then). The RESOLVED spec is written back into the hyper-parameters, so the
checkpoint alone rebuilds the model.

Conditioning code grid (hook): hierarchical codes arrive as a mapping ``{level: tensor}`` (from the
tokenizer) or packed (from code files, :func:`data.codes.unpack_levels`); the prior models ``level``
and receives ``codes[context_level]`` as ``context`` in ``loss`` (and, from the caller, in ``sample``).
How it enters the network (cross-attention, an added upsampled embedding) is the subclass's choice;
:meth:`context_layout` gives its shape.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch import Tensor

from layers.instantiate import ConfigError, resolve_target
from stage1.tokenizer import CHECKPOINT_KEY, read_checkpoint
from stage2.code_layout import CodeLayout, level_spec, plain
from stage2.embedding import ClassEmbedding, CodeEmbedding
from stage2.optim import parameter_groups, warmup_cosine
from stage2.options import SamplingOption, check_sample_signature

FORMAT_VERSION = 2  # 2: shared embeddings (embed.*, classes.*); see _LEGACY_KEYS


@dataclass
class PriorLoss:
    """What :meth:`Prior.loss` returns: the objective, the NLL per token (nats), aux and extra stats."""

    loss: Tensor
    nll: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


def resolve_code_spec(
    codes: str | None,
    code_spec: Mapping[str, Any] | None,
    num_classes: int | None,
    tokenizer_path: str | None,
    tokenizer: Any = None,
) -> tuple[dict[str, Any], int | None, str | None]:
    """Fill ``code_spec``, ``num_classes`` and ``tokenizer_path`` from the code folder or the tokenizer.

    Explicit arguments win. ``num_classes = 0`` asks for an unconditional prior even on labelled codes
    and resolves to ``None``. Neither the folder nor the tokenizer is read when ``code_spec`` is given,
    so a model rebuilt from its checkpoint touches neither.
    """
    if code_spec is None:
        if codes is not None:
            from data.codes import code_folder_info

            info = code_folder_info(codes)
            code_spec = info["code_spec"]
            num_classes = info["num_classes"] if num_classes is None else num_classes
            tokenizer_path = tokenizer_path or info["tokenizer_path"]
        elif tokenizer is not None:
            code_spec = tokenizer.code_spec
        else:
            raise ConfigError("a prior needs codes (a code-file folder), a tokenizer checkpoint, or code_spec")
    num_classes = int(num_classes) if num_classes else None
    return plain(code_spec), num_classes, (str(tokenizer_path) if tokenizer_path else None)


class Prior(pl.LightningModule):
    """Base LightningModule of every prior; see the module docstring for what a subclass defines."""

    kind = "prior"
    sampling_options: ClassVar[tuple[SamplingOption, ...]] = ()
    code_kinds: ClassVar[frozenset[str]] = frozenset({"discrete"})
    accepts_context: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Merge the base arguments into the subclass's signature (config checks, help) and check that
        ``sample`` accepts every declared sampling option."""
        super().__init_subclass__(**kwargs)
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
        own = [p for p in params if p.kind is not p.VAR_KEYWORD]
        if len(own) < len(params):  # it passes **prior on: the parent's arguments are its arguments too
            names = {p.name for p in own}
            parent = inspect.signature(cls.__mro__[1]).parameters.values()
            own += [p.replace(kind=p.KEYWORD_ONLY) for p in parent
                    if p.name not in names and p.kind is not p.VAR_KEYWORD]
        cls.__signature__ = inspect.Signature(own)
        check_sample_signature(cls, cls.sampling_options)

    def __init__(
        self,
        codes: str | None = None,
        code_spec: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        tokenizer_path: str | None = None,
        tokenizer: str | None = None,
        level: str | None = None,
        context_level: str | None = None,
        cond_drop_prob: float = 0.1,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_steps: int = 500,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self._frozen: list[Any] = []  # the frozen tokenizer, in a list so it is no submodule (not saved)
        self.cond_drop_prob = cond_drop_prob
        self.tokenizer_ckpt, self.level, self.context_level = tokenizer, level, context_level
        self._layout: CodeLayout | None = None
        if codes is not None or code_spec is not None or tokenizer is not None:
            self.setup_codes(codes, code_spec, num_classes, tokenizer_path)
        # else: a subclass written before this base resolves its codes itself with setup_codes(...)

    def setup_codes(self, codes: str | None, code_spec: Mapping[str, Any] | None, num_classes: int | None,
                    tokenizer_path: str | None) -> None:
        """Resolve the code spec (folder, explicit, or frozen tokenizer) and store the RESOLVED values in
        the hyper-parameters. The base's ``__init__`` calls it; subclasses need not."""
        if self.tokenizer_ckpt is not None and code_spec is None and codes is None and not self._frozen:
            self._frozen.append(self._load_tokenizer(self.tokenizer_ckpt))
        spec, num_classes, tokenizer_path = resolve_code_spec(
            codes, code_spec, num_classes, tokenizer_path or self.tokenizer_ckpt,
            self._frozen[0] if self._frozen else None)
        for key in list(self.hparams.keys()):
            self.hparams[key] = plain(self.hparams[key])
        self.hparams.update(code_spec=spec, num_classes=num_classes, tokenizer_path=tokenizer_path)
        self.code_spec, self.num_classes, self.tokenizer_path = spec, num_classes, tokenizer_path
        # only when the folder is what the spec came from: a prior rebuilt from its stored hparams (spec
        # given) must not need the folder it was trained on
        if num_classes and codes is not None and code_spec is None and self.hparams.get("class_names") is None:
            from data.codes import code_folder_info  # the folder's names of its classes, kept for sample --class

            names = code_folder_info(codes).get("class_names")
            self.hparams["class_names"] = list(names) if names and len(names) == num_classes else None
        self.class_names: list[str] | None = self.hparams.get("class_names")
        self._layout = CodeLayout.from_spec(level_spec(spec, self.level))
        kind = "continuous" if self._layout.continuous else "discrete"
        if kind not in self.code_kinds:
            raise ConfigError(f"{type(self).__name__} models {'/'.join(sorted(self.code_kinds))} codes; "
                              f"the code spec is {kind}: {spec}")
        if self.context_level is not None and not self.accepts_context:
            raise ConfigError(f"{type(self).__name__} takes no conditioning code grid (context_level)")

    # --- shapes -------------------------------------------------------------------------------
    @property
    def layout(self) -> CodeLayout:
        if self._layout is None:
            raise ConfigError(f"{type(self).__name__}: a prior needs codes (a code-file folder), "
                              "a tokenizer checkpoint, or code_spec")
        return self._layout

    @property
    def grid(self) -> tuple[int, ...]:
        return self.layout.grid

    @property
    def code_depth(self) -> int | None:
        return self.layout.depth

    @property
    def codebook_size(self) -> int:
        return self.layout.codebook_size  # type: ignore[return-value]

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one sample's codes: ``(*grid)``, ``(*grid, depth)`` or ``(*grid, dim)``."""
        return self.layout.shape

    def flatten_codes(self, codes: Tensor) -> Tensor:
        """``(B, *code_shape) -> (B, N)``: row-major over the grid, depth-minor."""
        return self.layout.flatten(codes)

    def unflatten_codes(self, flat: Tensor) -> Tensor:
        return self.layout.unflatten(flat)

    def context_layout(self) -> CodeLayout | None:
        """The layout of the conditioning code grid (``context_level``), if any."""
        return CodeLayout.from_spec(level_spec(self.code_spec, self.context_level)) if self.context_level else None

    # --- shared building blocks -----------------------------------------------------------------
    def code_embedding(self, dim: int, extra_tokens: int = 0) -> CodeEmbedding:
        """Token (+ depth level) embedding of this prior's codes; ``extra_tokens`` rows follow the codebook."""
        return CodeEmbedding(self.layout, dim, extra_tokens)

    def class_embedding(self, dim: int) -> ClassEmbedding:
        """Class embedding with a last null row (the only row of an unconditional prior)."""
        return ClassEmbedding(self.num_classes, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes or 0

    # --- conditioning ---------------------------------------------------------------------------
    def drop_labels(self, labels: Tensor | None) -> Tensor | None:
        """Label dropout for classifier-free guidance: each label becomes the null class with ``cond_drop_prob``."""
        if labels is None or self.cond_drop_prob == 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.cond_drop_prob
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

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

    def guidance_labels(self, n: int, cond: Any, cfg_scale: float) -> tuple[Tensor, bool]:
        """Labels for one sampling forward: ``(n,)`` (the null class when ``cond`` is None), or, when
        guiding (``cfg_scale != 0`` and a ``cond``), ``(2n,)`` = the classes then n null labels."""
        labels = self.cond_tensor(n, cond)
        guided = cfg_scale != 0 and labels is not None
        if labels is None:
            labels = torch.full((n,), self.null_class, dtype=torch.long, device=self.device)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        return labels, guided

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode (no dropout) for the duration of a sampling loop, then the previous mode."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    # --- batches --------------------------------------------------------------------------------
    @staticmethod
    def _load_tokenizer(path: str) -> Any:
        from stage1.tokenizer import load_tokenizer

        return load_tokenizer(path).eval().requires_grad_(False)

    @property
    def frozen_tokenizer(self) -> Any:
        """The frozen tokenizer named by ``tokenizer`` (loaded on first use), on this prior's device."""
        if not self._frozen:
            if self.tokenizer_ckpt is None:
                raise ValueError("the batch holds raw data ('x') but this prior has no tokenizer to encode it; "
                                 "set tokenizer: PATH in its config, or train on a code folder")
            self._frozen.append(self._load_tokenizer(self.tokenizer_ckpt))
        tok = self._frozen[0]
        return tok.to(self.device).eval()

    @torch.no_grad()
    def encode_batch(self, x: Tensor) -> Any:
        """Codes of raw data through the frozen tokenizer (eval mode, no gradients), in the code layout the
        tokenizer's ``encode`` returns and code files store (continuous latents channel-last)."""
        return self.frozen_tokenizer.encode(x)

    def batch_labels(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        """The batch's labels for a class-conditional prior, else ``None`` (labels are ignored)."""
        if self.num_classes is None:
            return None
        if "label" not in batch:
            raise ValueError(
                "a class-conditional prior needs batch['label']; set num_classes: 0 to train unconditionally"
            )
        return batch["label"].long()

    def unpack_batch(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(codes, labels, context)`` of a code-file batch or of a raw-data batch (``"x"``) encoded here."""
        codes = batch["codes"] if "codes" in batch else self.encode_batch(batch["x"])
        context = None
        if self.code_spec.get("levels") and not isinstance(codes, Mapping):  # packed levels of a code file
            from data.codes import unpack_levels

            codes = unpack_levels(codes, self.code_spec)
        if isinstance(codes, Mapping):  # hierarchical codes: {level: codes}
            context = codes[self.context_level] if self.context_level else None
            codes = codes[self.level]
        return codes, self.batch_labels(batch), context

    # --- training -------------------------------------------------------------------------------
    def loss(self, codes: Tensor, labels: Tensor | None, context: Tensor | None = None,
             generator: torch.Generator | None = None) -> PriorLoss:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        codes, labels, context = self.unpack_batch(batch)
        out = self.loss(codes, self.drop_labels(labels), context)
        total = out.loss + out.aux["aux_loss"] if "aux_loss" in out.aux else out.loss
        b = codes.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=b)
        self.log("train/nll", out.nll.detach(), batch_size=b)
        for key, value in out.stats.items():
            self.log(f"train/{key}", value, batch_size=b)
        self.log_aux(out.aux, "train", b)
        return total

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        codes, labels, context = self.unpack_batch(batch)
        # the same random draws (masks, noise) at every validation, so val/loss moves with the model
        g = torch.Generator(device=self.device).manual_seed(batch_idx)
        out = self.loss(codes, labels, context, generator=g)
        b = codes.shape[0]
        self.log("val/loss", out.nll, prog_bar=True, batch_size=b, sync_dist=True)
        self.log("val/bits_per_token", out.nll / math.log(2), batch_size=b, sync_dist=True)
        for key, value in out.stats.items():
            self.log(f"val/{key}", value, batch_size=b, sync_dist=True)
        self.log_aux(out.aux, "val", b)

    def log_aux(self, aux: Mapping[str, Tensor], stage: str, batch_size: int) -> None:
        """Log the network's auxiliary loss and per-layer statistics (e.g. MoE load) when present."""
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
        """AdamW (no decay on norms, biases, embeddings) with warm-up then cosine to ``min_lr_ratio * lr``.

        The cosine horizon is ``max_steps`` when set, else the trainer's estimated stepping batches.
        """
        hp = self.hparams
        opt = torch.optim.AdamW(parameter_groups(self, hp.get("weight_decay", 0.05)), lr=float(hp.get("lr", 3e-4)),
                                betas=tuple(hp.get("betas", (0.9, 0.95))))
        total = hp.get("max_steps")
        if total is None and self._trainer is not None:
            est = self.trainer.estimated_stepping_batches
            total = int(est) if est != float("inf") else None
        sched = warmup_cosine(opt, int(hp.get("warmup_steps", 0)), total, float(hp.get("min_lr_ratio", 0.1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- sampling and checkpoints -------------------------------------------------------------------
    def sample(self, n: int, cond: Any = None, **sampling: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def preview(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Codes for a sample-grid callback: class-balanced when conditional, default sampling options."""
        cond = torch.arange(n, device=self.device) % self.num_classes if self.num_classes else None
        return self.sample(n, cond=cond, generator=generator)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.setdefault(CHECKPOINT_KEY, {})
        meta.update({"kind": self.kind, "target": f"{type(self).__module__}.{type(self).__qualname__}",
                     "code_spec": self.code_spec, "tokenizer_path": self.tokenizer_path,
                     "format_version": FORMAT_VERSION})


# format 1 (before the shared base) kept its embeddings on the prior itself
_LEGACY_KEYS = {"tok_emb.": "embed.tokens.", "level_emb.": "embed.levels.", "cls_emb.": "classes.table."}


def _upgrade_state_dict(state: dict[str, Tensor], version: int) -> dict[str, Tensor]:
    if version >= 2:
        return state
    out = {}
    for key, value in state.items():
        for old, new in _LEGACY_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old):]
        if key == "start":  # the unconditional AR start vector is now the null class row
            key, value = "classes.table.weight", value.reshape(1, -1)
        out[key] = value
    return out


def prior_class(target: str) -> type[Prior]:
    """The prior class a checkpoint's ``target`` names; refuses anything that is not a :class:`Prior`."""
    cls = resolve_target(target)
    if not (isinstance(cls, type) and issubclass(cls, Prior)):
        raise ConfigError(f"target {target} is not a stage2 Prior")
    return cls


def sampling_options_of(path: str | Path | None) -> tuple[SamplingOption, ...]:
    """The sampling options the prior stored at ``path`` declares; ``()`` for anything else (a tokenizer,
    a missing or unreadable file: the command then reports that itself). Memory-maps the checkpoint,
    so only its metadata is read."""
    if not path or not Path(path).is_file():
        return ()
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(CHECKPOINT_KEY) or {}
        return prior_class(meta["target"]).sampling_options if meta.get("kind") == "prior" else ()
    except Exception:  # noqa: BLE001 - not a readable prior: no flags; loading it later says why
        return ()


def prior_from_checkpoint(ckpt: Mapping[str, Any], path: str | Path,
                          map_location: str | torch.device = "cpu") -> Prior:
    """Rebuild a prior from an already loaded checkpoint dict, in eval mode (see :func:`load_prior`)."""
    meta = ckpt[CHECKPOINT_KEY]
    try:
        cls = prior_class(meta["target"])
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    model = cls(**dict(ckpt.get("hyper_parameters", {})))
    model.load_state_dict(_upgrade_state_dict(dict(ckpt["state_dict"]), int(meta.get("format_version", 1))))
    return model.to(map_location).eval()


def load_prior(path: str | Path, map_location: str | torch.device = "cpu") -> Prior:
    """Rebuild a prior from its checkpoint alone (``weights_only=True``), in eval mode.

    Refuses checkpoints of another kind (e.g. a tokenizer) with a message saying what it holds.
    """
    return prior_from_checkpoint(read_checkpoint(path, expected_kind="prior"), path, map_location)
