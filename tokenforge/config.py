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
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from layers.instantiate import ConfigError, check_params, resolve_target

TOP_LEVEL_KEYS = {
    "model": "the model spec {target, params}",
    "data": "the DataModule spec {target, params}",
    "trainer": "keyword arguments of pytorch_lightning.Trainer",
    "callbacks": "a list of extra callback specs {target, params}",
    "seed": "the global random seed",
    "checkpoint_every_n_steps": "how often last.ckpt is refreshed (training steps)",
    "run": "free-form notes stored with the run (description, tags)",
}


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


def _merge_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
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
            if not (parent.endswith("params") or parent == "trainer"):
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
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping with sections {', '.join(TOP_LEVEL_KEYS)}")
    cfg = _merge_overrides(cfg, overrides)
    validate_config(cfg)
    return cfg


def to_plain(cfg: Any) -> Any:
    """A resolved plain-Python copy (dicts/lists/scalars), safe to store in ``weights_only`` checkpoints."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    return cfg


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
    check_spec_tree(plain["model"], "model")
    check_spec_tree(plain["data"], "data")
    for i, cb in enumerate(plain.get("callbacks") or []):
        check_spec_tree(cb, f"callbacks[{i}]")
    trainer = plain.get("trainer") or {}
    if not isinstance(trainer, Mapping):
        raise ConfigError("'trainer' must be a mapping of pytorch_lightning.Trainer keyword arguments")
    import pytorch_lightning as pl

    check_params(pl.Trainer.__init__, trainer, "trainer")


def check_spec_tree(node: Any, where: str) -> None:
    """Recursively validate every ``{target, params}`` mapping inside ``node``."""
    if isinstance(node, Mapping):
        if "target" in node:
            unknown = set(node) - {"target", "params"}
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; a component spec has only "
                                  "'target' and 'params'")
            fn = resolve_target(node["target"])
            params = node.get("params") or {}
            if not isinstance(params, Mapping):
                raise ConfigError(f"{where}.params must be a mapping, got {type(params).__name__}")
            check_params(fn, params, f"{where}.params")
            for k, v in params.items():
                check_spec_tree(v, f"{where}.params.{k}")
        else:
            for k, v in node.items():
                check_spec_tree(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_spec_tree(v, f"{where}[{i}]")
