"""Config loading: OmegaConf YAML + dotlist overrides, validated before anything is built.

A config has the sections ``model`` and ``data`` (component specs ``{target, params}``),
``trainer`` (keyword arguments of ``pytorch_lightning.Trainer``), and optionally ``callbacks``
(a list of component specs), ``seed``, ``checkpoint_every_n_steps``, ``run``. Every component spec
anywhere in ``model``/``data``/``callbacks`` is checked up front: the target must be allow-listed and
importable and every parameter must exist in its signature, so a typo fails in the first second
with the key's path and the valid names rather than after an hour of training.
"""

from __future__ import annotations

import difflib
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from layers.instantiate import Base, ConfigError, check_params, check_spec

TOP_LEVEL_KEYS = {
    "model": "the model spec {target, params}",
    "data": "the DataModule spec {target, params}",
    "trainer": "keyword arguments of pytorch_lightning.Trainer",
    "callbacks": "a list of extra callback specs {target, params}",
    "seed": "the global random seed",
    "checkpoint_every_n_steps": "how often last.ckpt is refreshed (training steps)",
    "run": "free-form notes stored with the run (description, tags)",
    "allow_tf32": "TF32 matmuls/convolutions on Ampere+ GPUs (default true; see tokenforge.acceleration)",
    "fused_optimizer": "step Adam/AdamW with torch's fused kernel where supported (default true)",
}
BOOLEAN_TOP_LEVEL_KEYS = ("allow_tf32", "fused_optimizer")


def _missing_path_message(cfg: DictConfig, path: str) -> str:
    """Name the first segment of ``path`` that does not exist, with close matches among its siblings."""
    node: Any = cfg
    done: list[str] = []
    for part in path.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            valid = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
            close = difflib.get_close_matches(part, valid, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            where = ".".join(done) or "the top level"
            return f"unknown key {part!r} under {where}.{hint} Valid keys: {', '.join(valid)}"
        node = node[part]
        done.append(part)
    return f"{path!r} does not exist in the config"


def merge_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Apply ``key.path=value`` overrides; a new key is only accepted under ``params`` or ``trainer``, or as
    a known top-level key (e.g. ``allow_tf32=false``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key = item.split("=", 1)[0].strip()
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if parent and node is None:
            raise ConfigError(f"override {item!r}: {_missing_path_message(cfg, parent)}")
        # A new key is only allowed under a component's `params` or `trainer`, where the target's
        # signature validates it right after; anywhere else it is almost certainly a typo.
        if isinstance(node, DictConfig) and leaf not in node:
            if not (parent.endswith("params") or parent == "trainer" or (not parent and leaf in TOP_LEVEL_KEYS)):
                valid = sorted(str(k) for k in node.keys())
                close = difflib.get_close_matches(leaf, valid, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"override {item!r}: unknown key {leaf!r} under {parent or 'the top level'}.{hint} "
                                  f"Valid keys: {', '.join(valid)}")
    cfg = cfg.copy()
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        try:
            value = OmegaConf.from_dotlist([item])
            value = OmegaConf.select(value, key)
            # A mapping value REPLACES the node (e.g. swap a whole quantizer spec); scalars and lists
            # set the key. Merging would keep the old target's parameters next to the new target.
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"cannot apply override {item!r}: {err}") from err
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Read a YAML config, apply ``key.path=value`` overrides and validate the result."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (expected a YAML file such as configs/vqgan.yaml)")
    try:  # OmegaConf's loader is YAML's SafeLoader: a `!!python/...` tag is an error, never a call
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not a valid config: {str(err).splitlines()[0]}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping with sections {', '.join(TOP_LEVEL_KEYS)}")
    cfg = merge_overrides(cfg, overrides)
    validate_config(cfg)
    return cfg


def to_plain(cfg: Any) -> Any:
    """A resolved plain-Python copy (dicts/lists/scalars), safe to store in ``weights_only`` checkpoints."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return cfg


# The train command sets these itself; a config value would silently fight it (or, for ``logger`` and
# ``callbacks``, instantiate objects outside the checks below). ``model_registry`` uploads checkpoints.
RESERVED_TRAINER_KEYS = {
    "default_root_dir": "the run folder is --runs/--name",
    "callbacks": "use the top-level `callbacks:` list of {target, params} specs",
    "logger": "CSV and TensorBoard logs are always written under the run folder's logs/",
    "model_registry": "it uploads checkpoints to a remote registry; tokenforge runs offline",
}


# Callback parameters that name a file or folder it writes (ours: out_dir; Lightning's: dirpath, filename).
PATH_PARAM = re.compile(r"(^|_)(dir|dirpath|path|file|filename|root|folder)$")


class PathNotAllowedError(ConfigError):
    """A path parameter points outside the folder it is confined to."""


def confine_paths(params: Mapping[str, Any], root: str | Path, where: str) -> dict[str, Any]:
    """Keep every path-like parameter of a callback inside ``root`` (the run folder).

    Relative paths are taken relative to ``root`` (``filename`` stays relative: Lightning joins it to
    ``dirpath``); absolute paths, ``~`` and ``..`` are refused, so a config cannot make training write
    into, say, ``site-packages``.
    """
    out = dict(params)
    for key, value in params.items():
        if not (isinstance(value, str) and PATH_PARAM.search(key)):
            continue
        path = Path(value)
        if path.is_absolute() or value.startswith("~") or ".." in path.parts:
            raise PathNotAllowedError(f"{where}.params.{key}={value!r}: files a callback writes stay inside the run "
                                      f"folder ({root}); give a path relative to it without '..'")
        if key not in ("file", "filename"):
            out[key] = str(Path(root) / path)
    return out


def section_bases() -> dict[str, Base]:
    """The class every top-level section's target must derive from."""
    import pytorch_lightning as pl

    return {"model": pl.LightningModule, "data": pl.LightningDataModule, "callbacks": pl.Callback}


def validate_config(cfg: DictConfig) -> None:
    """Check sections, every component spec and the trainer keywords; raise :class:`ConfigError`."""
    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(str(key), list(TOP_LEVEL_KEYS), n=2)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown top-level key {key!r}.{hint} Valid keys: {', '.join(TOP_LEVEL_KEYS)}")
    for section in ("model", "data"):
        if section not in cfg:
            raise ConfigError(f"config has no {section!r} section ({TOP_LEVEL_KEYS[section]})")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        missing = re.search(r"Missing mandatory value: ([\w.\[\]]+)", str(err))
        key = missing.group(1) if missing else getattr(err, "full_key", "key")
        raise ConfigError(f"config value {key!r} is missing or unresolvable ({str(err).splitlines()[0]}). "
                          f"Set it on the command line, e.g. {key}=...") from err
    validate_plain(plain)


def validate_plain(plain: Mapping[str, Any]) -> None:
    """The checks of :func:`validate_config` on a plain dict (as stored in a checkpoint)."""
    from tokenforge.acceleration import split_runtime_params

    bases = section_bases()
    model_spec, runtime = split_runtime_params(plain["model"])  # compile / channels_last: not constructor args
    check_spec_tree(model_spec, "model", bases["model"])
    if not isinstance(runtime.get("channels_last", False), bool):
        raise ConfigError(f"model.params.channels_last must be true or false, got {runtime['channels_last']!r}")
    if not isinstance(runtime.get("compile", False), (bool, str)):
        raise ConfigError(f"model.params.compile must be true, false or a torch.compile backend name, "
                          f"got {runtime['compile']!r}")
    for key in BOOLEAN_TOP_LEVEL_KEYS:
        if not isinstance(plain.get(key, True), bool):
            raise ConfigError(f"{key} must be true or false, got {plain[key]!r}")
    check_spec_tree(plain["data"], "data", bases["data"])
    callbacks = plain.get("callbacks") or []
    if not isinstance(callbacks, list):
        raise ConfigError("'callbacks' must be a list of {target, params} specs")
    for i, cb in enumerate(callbacks):
        check_spec_tree(cb, f"callbacks[{i}]", bases["callbacks"])
    trainer = plain.get("trainer") or {}
    if not isinstance(trainer, Mapping):
        raise ConfigError("'trainer' must be a mapping of pytorch_lightning.Trainer keyword arguments")
    check_trainer_kwargs(trainer)


def check_trainer_kwargs(trainer: Mapping[str, Any]) -> None:
    """Refuse reserved keys, unknown keys and values of the wrong type (``max_steps=abc``)."""
    import pytorch_lightning as pl

    for key in trainer:
        if key in RESERVED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key} cannot be set in a config: {RESERVED_TRAINER_KEYS[key]}")
    check_params(pl.Trainer.__init__, trainer, "trainer")
    signature = inspect.signature(pl.Trainer.__init__, eval_str=True)
    for key, value in trainer.items():
        accepted = _plain_types(signature.parameters[key].annotation)
        if accepted is not None and not _matches(value, accepted):
            shown = " | ".join(sorted({a if isinstance(a, str) else repr(a) for a in _describe(accepted)}))
            raise ConfigError(f"trainer.{key}={value!r} has the wrong type: expected {shown}")


def _plain_types(annotation: Any) -> list[Any] | None:
    """Plain types and literal values a config can give for ``annotation``; None when unknown."""
    if annotation is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(annotation)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            sub = _plain_types(arg)
            if sub:
                out += sub
        return out or None
    if origin is typing.Literal:
        return [("literal", v) for v in typing.get_args(annotation)]
    if annotation is type(None):
        return [type(None)]
    if annotation in (int, float, str, bool):
        return [annotation]
    if origin in (list, dict) or annotation in (list, dict):
        return [origin or annotation]
    return []  # a class a config cannot express (Accelerator, Strategy, ...)


def _matches(value: Any, accepted: list[Any]) -> bool:
    for a in accepted:
        if isinstance(a, tuple):
            if value == a[1] and type(value) is type(a[1]):
                return True
        elif a is bool:
            if isinstance(value, bool):
                return True
        elif a is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif a is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return True
        elif isinstance(value, a):
            return True
    return False


def _describe(accepted: list[Any]) -> list[Any]:
    return [repr(a[1]) if isinstance(a, tuple) else ("None" if a is type(None) else a.__name__) for a in accepted]


def check_spec_tree(node: Any, where: str, base: Base | None = None) -> None:
    """Recursively validate every ``{target, params}`` mapping inside ``node``.

    ``base`` is what the top-level spec must derive from; nested specs (quantizers, FFNs, routers)
    must be ``nn.Module`` classes, and the code that builds them checks its own, narrower base again.
    """
    if isinstance(node, Mapping):
        if "target" in node:
            cls, params = check_spec(node, where, base) if base is not None else check_spec(node, where)
            check_params(cls, params, f"{where}.params")
            for k, v in params.items():
                check_spec_tree(v, f"{where}.params.{k}")
        else:
            if base is not None:
                raise ConfigError(f"{where}: expected a component spec {{target, params}}, got keys {sorted(node)}")
            for k, v in node.items():
                check_spec_tree(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_spec_tree(v, f"{where}[{i}]")
    elif base is not None:
        raise ConfigError(f"{where}: expected a component spec {{target, params}}, got {type(node).__name__}")
