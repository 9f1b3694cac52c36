"""Safe ``target``/``params`` instantiation shared by every package.

It lives in ``layers`` (which imports nothing else of the project) so that model code can rebuild
its own sub-modules from plain, checkpoint-safe dicts without importing the ``tokenforge`` front
door. A config can only name classes under this project's packages or a short allow-list of
torch/Lightning namespaces: a YAML file can never run arbitrary code.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

PROJECT_PACKAGES = ("stage1", "stage2", "layers", "metrics", "data", "tokenforge")
ALLOWED_EXTERNAL = (
    "torch.nn",
    "torch.optim",
    "pytorch_lightning.callbacks",
    "pytorch_lightning.loggers",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
)


class ConfigError(ValueError):
    """A config names something that does not exist, is not allowed, or has a wrong parameter."""


def _allowed(path: str) -> bool:
    root = path.split(".")[0]
    if root in PROJECT_PACKAGES:
        return True
    return any(path == p or path.startswith(p + ".") for p in ALLOWED_EXTERNAL)


def resolve_target(path: str) -> Any:
    """Import ``package.module.Name`` if it is allowed; otherwise raise :class:`ConfigError`."""
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"target must be a dotted path like 'stage1.vqgan.VQGAN', got {path!r}")
    if not _allowed(path):
        allowed = ", ".join(PROJECT_PACKAGES + ALLOWED_EXTERNAL)
        raise ConfigError(
            f"target {path!r} is not allowed: configs may only instantiate classes under {allowed}. "
            "This keeps a YAML file from running arbitrary code."
        )
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"target {path!r}: module {module_name!r} cannot be imported ({err})") from err
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=3)
        hint = f" Did you mean {', '.join(module_name + '.' + c for c in close)}?" if close else ""
        raise ConfigError(f"target {path!r}: {module_name!r} has no attribute {attr!r}.{hint}")
    return getattr(module, attr)


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


def instantiate(spec: Mapping[str, Any] | None, *args: Any, where: str = "config", **extra: Any) -> Any:
    """Build ``spec['target'](*args, **spec['params'], **extra)`` after checking target and params.

    ``spec`` must be a mapping with ``target`` and optional ``params``; nothing else is accepted, so
    a misspelt ``param:`` fails loudly instead of being ignored.
    """
    if spec is None:
        raise ConfigError(f"{where}: expected a mapping with 'target' and 'params', got nothing")
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a mapping with 'target' and 'params', got {type(spec).__name__}")
    unknown = set(spec) - {"target", "params"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; a component spec has only 'target' and 'params'")
    if "target" not in spec:
        raise ConfigError(f"{where}: missing 'target' (a dotted class path)")
    fn = resolve_target(spec["target"])
    params = dict(spec.get("params") or {})
    params.update(extra)
    check_params(fn, params, where)
    return fn(*args, **params)
