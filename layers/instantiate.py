"""Safe ``target``/``params`` instantiation shared by every package.

It lives in ``layers`` (which imports nothing else of the project) so that model code can rebuild
its own sub-modules from plain, checkpoint-safe dicts without importing the ``tokenforge`` front
door.

What a ``target`` may name (the rules hold for YAML, dotlist overrides, and everything read back from a
checkpoint or a code folder's manifest):

* a **class** (never a function, a module or any other callable: a function such as
  ``data.atomic.atomic_write_text`` would turn a config into an arbitrary file write),
* with a **public** dotted path (no segment starts with ``_``),
* **defined** under this project's packages or the short external allow-list (a class merely
  re-exported by a project module does not count),
* that is a subclass of the **base the call site expects**: ``LightningModule`` for ``model``,
  ``LightningDataModule`` for ``data``, ``Callback`` for ``callbacks``, ``Quantizer`` for quantizers,
  ``Router`` for MoE routers, ``nn.Module`` by default (FFNs, networks).

So a new component is still one file plus one config line (no registry to edit), while helpers,
writers and commands stay out of reach. See SECURITY.md.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

PROJECT_PACKAGES = ("stage1", "stage2", "layers", "metrics", "data", "tokenforge")
ALLOWED_EXTERNAL = (
    "torch.nn",
    "pytorch_lightning.callbacks",
)

Base = type | tuple[type, ...]


class ConfigError(ValueError):
    """A config names something that does not exist, is not allowed, or has a wrong parameter."""


class TargetNotAllowedError(ConfigError):
    """A ``target`` names something a config may not instantiate (outside the allow-list, private,
    not a class, or not of the kind the call site expects). Raised before anything is built."""


def _in_namespaces(path: str) -> bool:
    root = path.split(".")[0]
    if root in PROJECT_PACKAGES:
        return True
    return any(path == p or path.startswith(p + ".") for p in ALLOWED_EXTERNAL)


def _base_names(base: Base) -> str:
    bases = base if isinstance(base, tuple) else (base,)
    return " or ".join(f"{b.__module__}.{b.__qualname__}" for b in bases)


def resolve_target(path: str, base: Base = nn.Module, where: str = "config") -> type:
    """Import the class ``package.module.Name`` after every check above; else raise :class:`ConfigError`.

    Nothing is instantiated here; importing a module of the allowed namespaces has no side effects
    beyond defining classes.
    """
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"{where}: target must be a dotted class path like 'stage1.vqgan.VQGAN', got {path!r}")
    parts = path.split(".")
    if not all(p.isidentifier() for p in parts):
        raise TargetNotAllowedError(f"{where}: target {path!r} is not a dotted Python name")
    if any(p.startswith("_") for p in parts):
        raise TargetNotAllowedError(f"{where}: target {path!r} names a private module or attribute; "
                                    "configs may only instantiate public component classes")
    if not _in_namespaces(path):
        allowed = ", ".join(PROJECT_PACKAGES + ALLOWED_EXTERNAL)
        raise TargetNotAllowedError(
            f"{where}: target {path!r} is not allowed: configs may only instantiate classes under {allowed}. "
            "This keeps a YAML file from running arbitrary code."
        )
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{where}: target {path!r}: module {module_name!r} cannot be imported ({err})") from err
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_") and inspect.isclass(getattr(module, n))]
        close = difflib.get_close_matches(attr, names, n=3)
        hint = f" Did you mean {', '.join(module_name + '.' + c for c in close)}?" if close else ""
        raise ConfigError(f"{where}: target {path!r}: {module_name!r} has no attribute {attr!r}.{hint}")
    obj = getattr(module, attr)
    if not inspect.isclass(obj):
        what = "a module" if inspect.ismodule(obj) else ("a function" if callable(obj) else type(obj).__name__)
        raise TargetNotAllowedError(f"{where}: target {path!r} is {what}, not a class; configs instantiate "
                                    f"component classes only ({_base_names(base)})")
    defined = f"{obj.__module__}.{obj.__qualname__}"
    if not _in_namespaces(defined) or any(p.startswith("_") for p in obj.__qualname__.split(".")):
        raise TargetNotAllowedError(f"{where}: target {path!r} is {defined}, which lies outside the allowed "
                                    "namespaces (a re-exported or private class)")
    if not issubclass(obj, base):
        raise TargetNotAllowedError(f"{where}: target {path!r} is not a {_base_names(base)}, which is what "
                                    f"{where} needs")
    return obj


def check_params(fn: Any, params: Mapping[str, Any], where: str) -> None:
    """Refuse parameters that ``fn``'s signature does not accept, naming close matches."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    valid = [n for n, p in sig.parameters.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in params:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown parameter {key!r} at {where} for {getattr(fn, '__qualname__', fn)}.{hint} "
                f"Valid parameters: {', '.join(valid)}"
            )


def check_spec(spec: Any, where: str, base: Base = nn.Module) -> tuple[type, dict[str, Any]]:
    """Validate one ``{target, params}`` mapping; returns the class and a copy of its params."""
    if spec is None:
        raise ConfigError(f"{where}: expected a mapping with 'target' and 'params', got nothing")
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'target' and 'params', got {type(spec).__name__}")
    unknown = set(spec) - {"target", "params"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; a component spec has only 'target' and 'params'")
    if "target" not in spec:
        raise ConfigError(f"{where}: missing 'target' (a dotted class path)")
    cls = resolve_target(spec["target"], base=base, where=where)
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.params must be a mapping, got {type(params).__name__}")
    return cls, dict(params)


def instantiate(spec: Mapping[str, Any] | None, *args: Any, where: str = "config", base: Base = nn.Module,
                **extra: Any) -> Any:
    """Build ``spec['target'](*args, **spec['params'], **extra)`` after checking target, base and params.

    ``spec`` must be a mapping with ``target`` and optional ``params``; nothing else is accepted, so
    a misspelt ``param:`` fails loudly instead of being ignored. ``base`` is the class (or tuple of
    classes) the call site needs; anything else is refused before its constructor runs.
    """
    cls, params = check_spec(spec, where, base)
    params.update(extra)
    check_params(cls, params, where)
    return cls(*args, **params)
