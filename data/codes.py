"""The code-file format: integer codes from a stage-1 tokenizer, sharded, with a manifest.

A code folder holds ``manifest.json`` and, per split, shards ``{split}-{index:05d}.npy`` (codes,
``uint16`` when the codebook has at most 65536 entries, else ``int32``; ``float16`` channel-last latents
``(n, *grid, dim)`` for a ``continuous`` code spec, e.g. a KL-VAE's posterior means) and, when the data has labels,
``{split}-{index:05d}.labels.npy`` (int64); for variable-length data (audio clips) also
``{split}-{index:05d}.lengths.npy`` (int64): each item's original, unpadded length, so a decoder can
cut its output back to it (``AudioCodec.decode(codes, length=...)``); items then carry ``"length"``.
Shard ``i`` holds the split's items
``[i * shard_size, i * shard_size + count)``, so the shard index is a pure function of the data
position: distributed ranks write disjoint shards and an interrupted run knows where to resume.

Every file is written to a temporary name and renamed into place, so a killed run never leaves a half
shard; the manifest is rewritten (atomically, sorted keys, no timestamps) after each shard and rebuilt
from the files on disk by ``finalize()``. Re-running after an interruption therefore produces the same
bytes as a run that was never interrupted. Reading is memory-mapped, so a dataset larger than RAM
trains without loading it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from data.atomic import atomic_write

FORMAT = "tokenforge-codes"
VERSION = 1
MANIFEST = "manifest.json"
UINT16_MAX_CODES = 65536
FLOAT16_MAX = 65504.0
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5,})\.npy$")
_LABELS_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5,})\.labels\.npy$")
_LENGTHS_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5,})\.lengths\.npy$")
TOKENIZE_HINT = "python scripts/tokenize.py TOKENIZER.ckpt --out {folder}"


class CodeFileError(ValueError):
    """A code folder is missing, inconsistent, corrupt, or belongs to another tokenizer."""


class MissingCodesError(CodeFileError, FileNotFoundError):
    """The code folder or its manifest does not exist."""


# -- small helpers --------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB checkpoints need no memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.npy"


def labels_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.labels.npy"


def lengths_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.lengths.npy"


def continuous_dim(code_spec: Mapping[str, Any]) -> int | None:
    """Channels of a ``continuous`` code spec (``{"continuous": {"dim": d}}`` or ``continuous_dim``), else None."""
    cont = code_spec.get("continuous")
    dim = cont.get("dim") if isinstance(cont, Mapping) else None
    dim = dim or code_spec.get("continuous_dim")
    return int(dim) if dim else None


def code_dtype(code_spec: Mapping[str, Any]) -> np.dtype:
    """``uint16`` when every code fits (codebook_size <= 65536), else ``int32``; ``float16`` for the
    real-valued latents of a continuous code spec (a KL-VAE's posterior means, which GIVT models)."""
    if continuous_dim(code_spec):
        return np.dtype(np.float16)
    size = code_spec.get("codebook_size")
    if not isinstance(size, int) or size < 1:
        raise CodeFileError(
            f"code files hold integer codes, but this code_spec has codebook_size={size!r} "
            f"(continuous_dim={code_spec.get('continuous_dim')!r}); there is nothing to store as codes"
        )
    return np.dtype(np.uint16) if size <= UINT16_MAX_CODES else np.dtype(np.int32)


def sample_shape(code_spec: Mapping[str, Any]) -> tuple[int, ...]:
    """Shape of one item's codes: ``(*grid)`` or ``(*grid, depth)``; ``(total,)`` for a hierarchical spec,
    whose levels are stored packed (see :func:`pack_levels`)."""
    levels = level_shapes(code_spec)
    if levels is not None:
        return (sum(math.prod(shape) for shape in levels.values()),)
    grid = code_spec.get("grid")
    if not isinstance(grid, Sequence) or not grid:
        raise CodeFileError(f"code_spec needs a non-empty 'grid', got {grid!r}")
    # continuous latents (a KL-VAE's): channel-last ``(*grid, dim)``, as the tokenizer's encode returns them
    depth, dim = code_spec.get("depth"), continuous_dim(code_spec)
    return tuple(int(g) for g in grid) + ((int(depth),) if depth else ()) + ((dim,) if dim else ())


def level_shapes(code_spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Item shape of each level of a hierarchical spec (``"levels"``: VQ-VAE-2), in packing order (sorted
    names, so the order survives a manifest's sorted keys); ``None`` for a flat spec."""
    levels = code_spec.get("levels")
    if not levels:
        return None
    return {name: sample_shape({**levels[name], "levels": None}) for name in sorted(levels)}


def pack_levels(codes: Mapping[str, torch.Tensor], code_spec: Mapping[str, Any]) -> torch.Tensor:
    """``{level: (n, *shape)}`` -> ``(n, total)``: every level flattened, concatenated in packing order.

    One array per shard keeps the shard format (hashes, ranges, resuming) the same for hierarchical codes;
    the manifest records each level's shape and offset."""
    shapes = level_shapes(code_spec) or {}
    if set(codes) != set(shapes):
        raise CodeFileError(f"codes hold levels {sorted(codes)}, the code spec {sorted(shapes)}")
    parts = []
    for name, shape in shapes.items():
        level = torch.as_tensor(codes[name])
        if tuple(level.shape[1:]) != shape:
            raise CodeFileError(f"level {name!r} codes of shape {tuple(level.shape)} do not match the code spec: "
                                f"expected (n, {', '.join(map(str, shape))})")
        size = code_spec["levels"][name].get("codebook_size")
        if level.numel() and (int(level.min()) < 0 or (size and int(level.max()) >= size)):
            raise CodeFileError(f"level {name!r} codes span [{int(level.min())}, {int(level.max())}], outside "
                                f"its codebook [0, {size})")
        parts.append(level.reshape(level.shape[0], -1))
    return torch.cat(parts, dim=1)


def unpack_levels(flat: torch.Tensor, code_spec: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_levels`: ``(n, total)`` -> ``{level: (n, *shape)}``."""
    out, start = {}, 0
    for name, shape in (level_shapes(code_spec) or {}).items():
        size = math.prod(shape)
        out[name] = flat[:, start:start + size].reshape(flat.shape[0], *shape)
        start += size
    return out


def _plain(value: Any) -> Any:
    """JSON round trip: plain dicts/lists (OmegaConf containers and tuples compare equal afterwards)."""
    if hasattr(value, "items"):
        value = {str(k): _plain(v) for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        value = [_plain(v) for v in value]
    return json.loads(json.dumps(value))


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _dump_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    text = json.dumps(manifest, sort_keys=True, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _inside(folder: Path, name: str) -> Path:
    """``folder / name``, refused when it resolves outside ``folder`` (a ``..`` name or a symlink)."""
    path = folder / name
    if Path(name).name != name or path.resolve().parent != folder.resolve():
        raise CodeFileError(f"{folder / MANIFEST} names {name!r}, which lies outside the code folder")
    return path


def _verified_cache_file(path: Path, sha256: str) -> Path:
    from data.cache import cache_key, cache_root

    st = path.stat()
    key = cache_key({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256})
    return cache_root() / "verified-shards" / f"{key}.json"


def checked_range(path: Path, array: np.ndarray, sha256: str | None) -> tuple[int, int]:
    """``(min, max)`` of a shard's values, after checking its SHA-256 when ``sha256`` is given.

    A verified result is cached in the user's cache folder (never in the code folder, which may be
    someone else's), keyed by the file's path, size, mtime and hash: the next run reads nothing.
    """
    cache = _verified_cache_file(path, sha256) if sha256 else None
    if cache is not None and cache.is_file():
        try:
            found = json.loads(cache.read_text())
            return int(found["min"]), int(found["max"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if sha256 and sha256_file(path) != sha256:
        raise CodeFileError(f"shard {path} does not match its SHA-256 in the manifest (corrupt or changed); "
                            "re-run the tokenize command into a new --out")
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, -1)
    if cache is not None:
        try:
            _dump_manifest(cache, {"min": lo, "max": hi})
        except OSError:  # a read-only home only costs the check next time
            pass
    return lo, hi


def _open_npy(path: Path) -> np.ndarray:
    """Memory-map a shard; any failure becomes a :class:`CodeFileError` that names the file."""
    if not path.is_file():
        raise CodeFileError(f"shard {path} listed in the manifest is missing; re-run the tokenize command "
                            "with the same --out to rewrite it")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        raise CodeFileError(f"shard {path} cannot be read as a .npy array ({err}): it is corrupt; delete it "
                            "and re-run the tokenize command with the same --out to rewrite it") from err


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``folder/manifest.json``; a missing folder/manifest names the command that makes it."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        what = "does not exist" if not folder.exists() else f"has no {MANIFEST}"
        raise MissingCodesError(
            f"code folder {folder} {what}. Code files are written by tokenizing a dataset with a trained "
            f"tokenizer: `{TOKENIZE_HINT.format(folder=folder)}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CodeFileError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CodeFileError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        found = manifest.get("version")
        raise CodeFileError(f"{path} has format version {found!r}; this reader expects {VERSION}")
    check_manifest_entries(manifest, path)
    return manifest


def check_manifest_entries(manifest: Mapping[str, Any], path: Path) -> None:
    """Refuse shard entries that point outside the folder or that record out-of-range values.

    A manifest may come from someone else (a shared code folder): every ``file``/``labels`` entry
    must be a plain shard name of its own split (no folders, no ``..``), and the recorded value
    ranges must lie inside the codebook and the class count, so a bad folder fails on opening
    rather than deep inside a training step.
    """
    spec = manifest.get("code_spec")
    size = spec.get("codebook_size") if isinstance(spec, Mapping) else None
    num_classes = manifest.get("num_classes")
    splits = manifest.get("splits")
    if splits is None:
        return
    if not isinstance(splits, Mapping):
        raise CodeFileError(f"{path}: 'splits' must be a mapping of split names to shard lists")
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, Mapping) else None
        if not _SPLIT_RE.match(str(split)) or not isinstance(shards, list):
            raise CodeFileError(f"{path}: split {split!r} is malformed (a name of letters, digits and '_' "
                                "with a list of shards)")
        for entry in shards:
            if not isinstance(entry, Mapping):
                raise CodeFileError(f"{path}: split {split!r} lists a shard that is not a mapping: {entry!r}")
            index = entry.get("index")
            for key, name_of in (("file", shard_name), ("labels", labels_name)):
                name = entry.get(key)
                if key == "labels" and name is None:
                    continue
                if not isinstance(index, int) or name != name_of(str(split), index):
                    raise CodeFileError(
                        f"{path}: shard entry {key}={name!r} of split {split!r} is not the shard's own file name "
                        f"({name_of(str(split), index) if isinstance(index, int) else 'index missing'}); a "
                        "manifest may only name files inside its folder")
            for key in ("count", "max_label", "min_code", "max_code"):
                value = entry.get(key)
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                    raise CodeFileError(f"{path}: shard {entry.get('file')} has {key}={value!r}; expected a "
                                        "non-negative integer")
            if isinstance(size, int) and entry.get("max_code") is not None and entry["max_code"] >= size:
                raise CodeFileError(f"{path}: shard {entry['file']} records codes up to {entry['max_code']}, "
                                    f"outside the codebook [0, {size})")
            if num_classes is not None and entry.get("max_label") is not None and entry["max_label"] >= num_classes:
                raise CodeFileError(f"{path}: shard {entry['file']} records labels up to {entry['max_label']}, "
                                    f"but num_classes is {num_classes}")


def code_folder_info(folder: str | os.PathLike) -> dict[str, Any]:
    """What a prior sizes itself from: ``code_spec``, ``num_classes`` (None without labels) and
    ``tokenizer_path`` of the folder's manifest (checked by :func:`read_manifest`)."""
    manifest = read_manifest(folder)
    if "code_spec" not in manifest:
        raise CodeFileError(f"{Path(folder) / MANIFEST} has no 'code_spec'")
    tokenizer = manifest.get("tokenizer") or {}
    return {"code_spec": manifest["code_spec"], "num_classes": manifest.get("num_classes"),
            "tokenizer_path": tokenizer.get("path") if isinstance(tokenizer, Mapping) else tokenizer,
            "class_names": manifest.get("class_names")}


# -- writing --------------------------------------------------------------------------------------

def _per_item_ints(values: Any, n: int, what: str) -> np.ndarray:
    """One non-negative integer per item (labels, clip lengths) as int64, or a CodeFileError saying why not."""
    values = _to_numpy(values)
    if values.shape != (n,) or values.dtype.kind not in "iu" or (n and values.min() < 0):
        raise CodeFileError(f"{what} must be non-negative integers of shape ({n},), got {values.dtype} {values.shape}")
    return np.ascontiguousarray(values, dtype=np.int64)

class CodeWriter:
    """Write code shards into ``folder``, resumably.

    The caller cuts each split into chunks of ``shard_size`` items in a fixed order; chunk ``i`` is
    shard ``i``. Skip chunks for which :meth:`has_shard` is true (resume), :meth:`write_shard` the
    rest, then :meth:`finalize` once (on one rank, after all ranks are done).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        code_spec: Mapping[str, Any],
        tokenizer_path: str | os.PathLike,
        tokenizer_sha256: str,
        shard_size: int = 4096,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        # the data's names of its label classes (e.g. music keys): the manifest records them, and then
        # num_classes counts every named class, even one no item carries
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.folder = Path(folder)
        self.code_spec = _plain(dict(code_spec))
        self.dtype = code_dtype(self.code_spec)
        self.sample_shape = sample_shape(self.code_spec)
        self.shard_size = int(shard_size)
        self.tokenizer = {"path": str(tokenizer_path), "sha256": str(tokenizer_sha256)}
        self.manifest_path = self.folder / MANIFEST
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.manifest_path.exists():
            self._check_compatible(read_manifest(self.folder))
        else:
            self._check_empty()
        self._entries: dict[str, dict[int, dict[str, Any]]] = self._scan()
        self._write_manifest(complete=False)

    def _check_compatible(self, old: Mapping[str, Any]) -> None:
        old_tok = old.get("tokenizer") or {}
        if old_tok.get("sha256") != self.tokenizer["sha256"]:
            raise CodeFileError(
                f"code folder {self.folder} was made by another tokenizer: {old_tok.get('path')} "
                f"(sha256 {old_tok.get('sha256')}), not {self.tokenizer['path']} "
                f"(sha256 {self.tokenizer['sha256']}). Choose a new --out or delete the folder."
            )
        if _plain(old.get("code_spec")) != self.code_spec:
            raise CodeFileError(f"code folder {self.folder} holds code_spec {old.get('code_spec')}, "
                                f"not {self.code_spec}. Choose a new --out or delete the folder.")
        if old.get("shard_size") != self.shard_size:
            raise CodeFileError(
                f"code folder {self.folder} was written with shard_size={old.get('shard_size')}; resuming "
                f"with {self.shard_size} would misplace items. Use the same shard size, a new --out, or "
                "delete the folder."
            )

    def _check_empty(self) -> None:
        """Refuse to write shards into a folder of unrelated files (a mistyped --out)."""
        # The manifest itself may appear meanwhile: another rank creating the same folder.
        ours = (MANIFEST,)
        foreign = [p.name for p in self.folder.iterdir() if not (
            p.name in ours or _SHARD_RE.match(p.name) or _LABELS_RE.match(p.name) or _LENGTHS_RE.match(p.name)
            or p.name.endswith(".tmp"))]
        if foreign:
            raise CodeFileError(
                f"{self.folder} is not empty and is not a code folder (no {MANIFEST}; it holds e.g. "
                f"{foreign[0]}). Choose a new --out."
            )

    # shard bookkeeping ---------------------------------------------------------------------------
    @staticmethod
    def _check_split(split: str) -> None:
        if not _SPLIT_RE.match(split):
            raise ValueError(f"split names are letters, digits and '_' (got {split!r})")

    def has_shard(self, split: str, index: int) -> bool:
        """True when shard ``index`` of ``split`` is complete on disk (its codes file is renamed last)."""
        self._check_split(split)
        return (self.folder / shard_name(split, index)).is_file()

    def shard_bounds(self, index: int, total: int) -> tuple[int, int]:
        """Item range ``[start, stop)`` of shard ``index`` in a split of ``total`` items."""
        start = index * self.shard_size
        return start, min(start + self.shard_size, total)

    def num_shards(self, total: int) -> int:
        return -(-total // self.shard_size)

    def _describe(self, split: str, index: int) -> dict[str, Any]:
        """The manifest entry of one shard, from the files on disk."""
        path = self.folder / shard_name(split, index)
        codes = _open_npy(path)
        discrete = codes.dtype.kind in "iu"
        entry: dict[str, Any] = {"index": index, "file": path.name, "count": int(codes.shape[0]),
                                 "sha256": sha256_file(path), "labels": None, "max_label": None,
                                 "min_code": int(codes.min()) if codes.size and discrete else None,
                                 "max_code": int(codes.max()) if codes.size and discrete else None}
        lpath = self.folder / labels_name(split, index)
        if lpath.is_file():
            labels = _open_npy(lpath)
            entry.update(labels=lpath.name, labels_sha256=sha256_file(lpath),
                         max_label=int(labels.max()) if len(labels) else None)
        npath = self.folder / lengths_name(split, index)
        if npath.is_file():  # variable-length items: their original lengths
            entry.update(lengths=npath.name, lengths_sha256=sha256_file(npath))
        return entry

    def _scan(self) -> dict[str, dict[int, dict[str, Any]]]:
        entries: dict[str, dict[int, dict[str, Any]]] = {}
        for p in sorted(self.folder.iterdir()):
            m = _SHARD_RE.match(p.name)
            if m:
                split, index = m["split"], int(m["index"])
                entries.setdefault(split, {})[index] = self._describe(split, index)
        return entries

    def _manifest(self, complete: bool) -> dict[str, Any]:
        splits = {}
        max_label = None
        for split, shards in sorted(self._entries.items()):
            listed = [shards[i] for i in sorted(shards)]
            splits[split] = {"shards": listed, "count": sum(e["count"] for e in listed)}
            for e in listed:
                if e["max_label"] is not None:
                    max_label = e["max_label"] if max_label is None else max(max_label, e["max_label"])
        manifest = {
            "format": FORMAT, "version": VERSION, "tokenizer": self.tokenizer, "code_spec": self.code_spec,
            "dtype": self.dtype.name, "sample_shape": list(self.sample_shape), "shard_size": self.shard_size,
            "num_classes": None if max_label is None else max_label + 1,
            "complete": complete, "splits": splits,
        }
        if self.class_names is not None and max_label is not None:
            if max_label >= len(self.class_names):
                raise CodeFileError(f"labels up to {max_label}, but only {len(self.class_names)} class names")
            manifest.update(num_classes=len(self.class_names), class_names=self.class_names)
        levels = level_shapes(self.code_spec)
        if levels is not None:  # hierarchical codes: each level's shape and where it lies in a packed item
            offsets = np.cumsum([0] + [math.prod(shape) for shape in levels.values()])
            manifest["levels"] = {name: {"shape": list(shape), "offset": int(offsets[i])}
                                  for i, (name, shape) in enumerate(levels.items())}
        return manifest

    def _write_manifest(self, complete: bool) -> dict[str, Any]:
        manifest = self._manifest(complete)
        _dump_manifest(self.manifest_path, manifest)
        return manifest

    # writing -------------------------------------------------------------------------------------
    def write_shard(self, split: str, index: int, codes: Any, labels: Any = None, lengths: Any = None) -> Path:
        """Write shard ``index`` of ``split`` (codes ``(n, *sample_shape)``, or ``{level: codes}`` for a
        hierarchical spec, packed here; labels ``(n,)``; lengths ``(n,)``: each item's unpadded length) atomically."""
        self._check_split(split)
        if isinstance(codes, Mapping):
            codes = pack_levels(codes, self.code_spec)
        codes = _to_numpy(codes)
        if codes.ndim != 1 + len(self.sample_shape) or tuple(codes.shape[1:]) != self.sample_shape:
            raise CodeFileError(f"codes of shape {tuple(codes.shape)} do not match the code spec: expected "
                                f"(n, {', '.join(map(str, self.sample_shape))})")
        n = codes.shape[0]
        if not 1 <= n <= self.shard_size:
            raise CodeFileError(f"a shard holds 1..{self.shard_size} items, got {n}")
        if self.dtype.kind == "f":  # continuous latents: finite and inside float16's range
            if codes.dtype.kind != "f" or not np.isfinite(codes).all() or np.abs(codes).max() > FLOAT16_MAX:
                raise CodeFileError(f"continuous latents must be finite floats within ±{FLOAT16_MAX} (float16), "
                                    f"got {codes.dtype} spanning [{codes.min()}, {codes.max()}]")
        else:
            if codes.dtype.kind not in "iu":
                raise CodeFileError(f"codes must be integers, got {codes.dtype}")
            lo, hi = int(codes.min()), int(codes.max())
            if lo < 0 or hi >= self.code_spec["codebook_size"]:
                size = self.code_spec["codebook_size"]
                raise CodeFileError(f"codes span [{lo}, {hi}], outside the codebook [0, {size})")
        # Labels and lengths first, codes last: the codes file's existence marks the shard complete.
        for values, what, name in ((labels, "labels", labels_name), (lengths, "lengths", lengths_name)):
            if values is not None:
                _save_npy(self.folder / name(split, index), _per_item_ints(values, n, what))
        _save_npy(self.folder / shard_name(split, index), np.ascontiguousarray(codes, dtype=self.dtype))
        self._entries.setdefault(split, {})[index] = self._describe(split, index)
        self._write_manifest(complete=False)
        return self.folder / shard_name(split, index)

    def finalize(self) -> dict[str, Any]:
        """Rebuild the manifest from the shards on disk (all ranks' work), check it, mark it complete.

        Call once, after every rank has written its shards. Raises :class:`CodeFileError` when a split
        has a gap (a missing shard) or a short shard before its last, i.e. the run is not finished.
        """
        for p in self.folder.glob(".*.tmp"):  # leftovers of a killed write; no rank is writing now
            p.unlink(missing_ok=True)
        self._entries = self._scan()
        for split, shards in self._entries.items():
            indices = sorted(shards)
            missing = sorted(set(range(indices[-1] + 1)) - set(indices))
            if missing:
                raise CodeFileError(f"{self.folder}: split {split!r} lacks shards {missing[:10]}; "
                                    "re-run the tokenize command with the same --out to finish it")
            short = [i for i in indices[:-1] if shards[i]["count"] != self.shard_size]
            if short:
                raise CodeFileError(f"{self.folder}: split {split!r} shards {short[:10]} hold fewer than "
                                    f"shard_size={self.shard_size} items but are not the last shard")
            for part in ("labels", "lengths"):
                if len({shards[i].get(part) is None for i in indices}) > 1:
                    raise CodeFileError(f"{self.folder}: split {split!r} has {part} for some shards only")
        return self._write_manifest(complete=True)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# -- reading --------------------------------------------------------------------------------------
class CodeDataset(Dataset):
    """All shards of one split, memory-mapped and indexed as one sequence.

    Items are ``{"codes": LongTensor (*grid[, depth]), "label": LongTensor ()}`` (``label`` when the
    split has labels; ``"length"``, the item's original length, when it has lengths). Every shard is
    checked on opening: against the manifest (count, shape, dtype;
    its SHA-256 unless ``verify=False``) and for its value range (codes inside the codebook, labels
    inside ``num_classes``), so a corrupt, hostile or mismatched file fails here with its name
    rather than as a wrong batch mid-training. A verified shard's result is cached per user (keyed
    by path, size, mtime and hash), so the next run does not read it twice.
    """

    def __init__(self, folder: str | os.PathLike, split: str = "train", verify: bool = True,
                 limit: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        splits = self.manifest.get("splits") or {}
        if split not in splits:
            raise CodeFileError(f"code folder {self.folder} has no split {split!r} "
                                f"(it has: {', '.join(sorted(splits)) or 'none'})")
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"])
        self.sample_shape = tuple(self.manifest["sample_shape"])
        info = splits[split]
        self._shards = [dict(e) for e in info["shards"]]
        with_labels = {e.get("labels") is not None for e in self._shards}
        if len(with_labels) > 1:
            raise CodeFileError(f"{self.folder / MANIFEST}: split {split!r} has labels for some shards only")
        self.has_labels = with_labels == {True}
        self.has_lengths = all(e.get("lengths") for e in self._shards) and bool(self._shards)
        counts = [int(e["count"]) for e in self._shards]
        if sum(counts) != int(info["count"]):
            raise CodeFileError(f"{self.folder / MANIFEST}: split {split!r} count {info['count']} is not the "
                                f"sum of its shard counts ({sum(counts)})")
        self._offsets = np.cumsum([0] + counts)
        total = int(self._offsets[-1])
        self._length = total if limit is None else min(int(limit), total)
        self._maps: list[tuple[np.ndarray, np.ndarray | None]] | None = None
        self._open(check=True, verify=verify)

    def _open(self, check: bool = False, verify: bool = False) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Memory-map every shard; ``check`` (done once, in ``__init__``) also checks hashes and ranges."""
        if self._maps is None:
            maps = []
            for entry in self._shards:
                path = _inside(self.folder, entry["file"])
                codes = _open_npy(path)
                want = (int(entry["count"]), *self.sample_shape)
                if codes.dtype != self.dtype or codes.shape != want:
                    raise CodeFileError(
                        f"shard {path} holds {codes.dtype} {codes.shape} but the manifest says "
                        f"{self.dtype.name} {want}; the folder is inconsistent (re-run the tokenize command "
                        "into a new --out)"
                    )
                if check and self.dtype.kind == "f":  # latents: the hash only (no codebook to range-check)
                    if verify and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
                        raise CodeFileError(f"shard {path} does not match its SHA-256 in the manifest (corrupt "
                                            "or changed); re-run the tokenize command into a new --out")
                elif check:
                    lo, hi = checked_range(path, codes, entry.get("sha256") if verify else None)
                    size = int(self.manifest["code_spec"]["codebook_size"])
                    if lo < 0 or hi >= size:
                        raise CodeFileError(f"shard {path} holds codes in [{lo}, {hi}], outside the codebook "
                                            f"[0, {size}): it was not written by this folder's tokenizer")
                labels = None
                if self.has_labels:
                    lpath = _inside(self.folder, entry["labels"])
                    labels = _open_npy(lpath)
                    if labels.dtype != np.int64 or labels.shape != (int(entry["count"]),):
                        raise CodeFileError(f"labels {lpath} hold {labels.dtype} {labels.shape}, expected "
                                            f"int64 ({entry['count']},)")
                    if check:
                        lo, hi = checked_range(lpath, labels, entry.get("labels_sha256") if verify else None)
                        classes = self.manifest.get("num_classes")
                        if lo < 0 or (classes is not None and hi >= int(classes)):
                            raise CodeFileError(f"labels {lpath} lie in [{lo}, {hi}], outside the folder's "
                                                f"classes [0, {classes})")
                maps.append((codes, labels))
            self._maps = maps
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps would be pickled as full copies into each worker; re-open them there instead.
        state = dict(self.__dict__)
        state["_maps"] = None
        return state

    def __len__(self) -> int:
        return self._length

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= self._length):
            raise IndexError(f"index out of range for {self._length} items")
        maps = self._open()
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        # integer codes as int64; float16 latents as float32
        codes = np.empty((len(idx), *self.sample_shape), dtype=np.float32 if self.dtype.kind == "f" else np.int64)
        labels = np.empty(len(idx), dtype=np.int64) if self.has_labels else None
        for s in np.unique(shard):
            rows = np.nonzero(shard == s)[0]
            local = idx[rows] - self._offsets[s]
            shard_codes, shard_labels = maps[s]
            codes[rows] = shard_codes[local]
            if labels is not None:
                labels[rows] = shard_labels[local]
        batch: dict[str, Any] = {"codes": torch.from_numpy(codes)}
        if "levels" in self.manifest:  # hierarchical: {level: (B, *shape)}
            batch["codes"] = unpack_levels(batch["codes"], self.manifest["code_spec"])
        if labels is not None:
            batch["label"] = torch.from_numpy(labels)
        if self.has_lengths:
            batch["length"] = torch.from_numpy(self._lengths()[idx])
        return batch

    def _lengths(self) -> np.ndarray:
        """Every item's original length (read once: one int64 per item), checked against the manifest."""
        if getattr(self, "_all_lengths", None) is None:
            parts = []
            for entry in self._shards:
                path = _inside(self.folder, entry["lengths"])
                if entry.get("lengths_sha256") and sha256_file(path) != entry["lengths_sha256"]:
                    raise CodeFileError(f"lengths {path} do not match their SHA-256 in the manifest (corrupt or "
                                        "changed); re-run the tokenize command into a new --out")
                lengths = np.load(path, allow_pickle=False)
                if lengths.dtype != np.int64 or lengths.shape != (int(entry["count"]),):
                    raise CodeFileError(f"lengths {path} hold {lengths.dtype} {lengths.shape}, expected "
                                        f"int64 ({entry['count']},)")
                parts.append(lengths)
            self._all_lengths = np.concatenate(parts)
        return self._all_lengths

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if index < 0:
            index += self._length
        return _first(self.__getitems__([index]))


def _first(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Item 0 of a batch (level by level for hierarchical codes)."""
    return {k: _first(v) if isinstance(v, Mapping) else v[0] for k, v in batch.items()}


def _collate(batch: Any) -> dict[str, Any]:
    """Batches arrive whole from ``__getitems__``; a list of single items (no batching) is stacked."""
    if isinstance(batch, list):
        return {k: _collate([b[k] for b in batch]) if isinstance(batch[0][k], Mapping)
                else torch.stack([b[k] for b in batch]) for k in batch[0]}
    return batch


class CodesDataModule(pl.LightningDataModule):
    """Train/val loaders over a code folder; batches ``{"codes": LongTensor, "label": LongTensor}``.

    ``code_spec``, ``num_classes`` (max label + 1, or None without labels) and ``tokenizer_path`` are
    read from the manifest at construction, so a prior can size itself before ``setup()``.
    ``limit_train``/``limit_val`` keep the first items of each split (shards are contiguous, so this
    touches the fewest files).
    """

    def __init__(self, codes: str, batch_size: int = 64, num_workers: int = 0, limit_train: int | None = None,
                 limit_val: int | None = None, seed: int = 0, verify: bool = True,
                 allow_incomplete: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.folder = Path(codes)
        self.manifest = read_manifest(self.folder)
        if not self.manifest.get("complete", False):
            message = (f"code folder {self.folder} is from an unfinished tokenize run; re-run the tokenize command "
                       "with the same --out to complete it")
            if not allow_incomplete:
                raise CodeFileError(f"{message}, or set data.params.allow_incomplete=true to train on the "
                                    "shards written so far")
            warnings.warn(f"{message} (training on it because allow_incomplete=true)", stacklevel=2)
        self.code_spec: dict[str, Any] = self.manifest["code_spec"]
        self.num_classes: int | None = self.manifest.get("num_classes")
        self.tokenizer_path: str | None = (self.manifest.get("tokenizer") or {}).get("path")
        self.tokenizer_sha256: str | None = (self.manifest.get("tokenizer") or {}).get("sha256")
        self.batch_size, self.num_workers, self.seed, self.verify = batch_size, num_workers, seed, verify
        self.limits = {"train": limit_train, "val": limit_val}
        self.datasets: dict[str, CodeDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val"):
            if split not in self.datasets and split in self.manifest["splits"]:
                self.datasets[split] = CodeDataset(self.folder, split, verify=self.verify,
                                                   limit=self.limits[split])
        if "train" not in self.datasets and stage in (None, "fit"):
            raise CodeFileError(f"code folder {self.folder} has no 'train' split")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=_collate, generator=generator,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.datasets:
            self.setup()
        if "val" not in self.datasets:
            return []  # no val split: Lightning skips validation
        return self._loader("val", shuffle=False)
