"""The on-disk cache for generated/decoded datasets.

Decoding thousands of PNGs (or rendering, synthesising) costs seconds; the result is a plain array,
so it is stored once as ``.npy`` under a cache folder and reused. The file name carries a hash of every
parameter that changes the content, so a different size or a changed source file never reads a stale
array. Writes go to a temporary file that is renamed into place, so a crash (or two processes racing,
e.g. DDP ranks) never leaves a half-written array for the next run to trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from data.atomic import atomic_write

ENV_VAR = "TOKENFORGE_CACHE"
DEFAULT_CACHE = "~/.cache/tokenforge"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$TOKENFORGE_CACHE``, else ``~/.cache/tokenforge``."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(ENV_VAR) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def cache_key(params: Mapping[str, Any]) -> str:
    """A short stable hash of JSON-serialisable parameters (key order does not matter)."""
    text = json.dumps(dict(params), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_stamp(path: str | os.PathLike) -> dict[str, Any]:
    """Identify a source file by path, size and mtime: cheap, and changes when the package is upgraded."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def save_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def cached_array(
    name: str,
    params: Mapping[str, Any],
    build: Callable[[], np.ndarray],
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """Load ``{name}-{hash(params)}.npy`` from the cache, or ``build()`` it and store it atomically.

    An unreadable cache file (truncated by a full disk, say) is rebuilt rather than trusted.
    """
    path = cache_root(cache_dir) / f"{name}-{cache_key(params)}.npy"
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            pass
    array = np.ascontiguousarray(build())
    try:
        save_npy_atomic(path, array)
    except OSError as err:  # a read-only home must not stop training; it only costs the decode next time
        warnings.warn(f"could not write dataset cache {path}: {err}", stacklevel=2)
    return array
