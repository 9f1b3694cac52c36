"""What a prior models, read from a tokenizer's code spec: the grid, the depth, discrete or continuous.

Code specs come in four shapes (``stage1`` writes them, code folders store them):

* flat: ``{"grid": [H, W], "depth": None, "codebook_size": K}``: codes ``(B, H, W)``;
* residual or grouped: ``"depth": D``: codes ``(B, H, W, D)`` (the groups axis of a grouped quantizer
  plays the role of depth);
* hierarchical: ``{"levels": {"top": {...}, "bottom": {...}}, ...}``, one sub-spec per named level
  (keys the sub-spec omits are inherited from the outer spec); a prior models ONE level, chosen by its
  ``level`` argument, and may be conditioned on another (see :class:`stage2.prior.Prior`);
* continuous: ``"continuous": {"dim": C}`` (or ``"continuous_dim": C``) and no codebook: latents
  ``(B, H, W, C)``, channel-last like depth (GIVT).

A sample's codes are flattened row-major over the grid, depth-minor, into ``seq_len`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from layers.instantiate import ConfigError


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


def level_spec(spec: Mapping[str, Any], level: str | None) -> dict[str, Any]:
    """The spec of one named level of a hierarchical spec (or the spec itself when it has no levels)."""
    spec = plain(spec)
    levels = spec.get("levels")
    if not levels:
        if level is not None:
            raise ConfigError(f"level={level!r} was given but the code spec has no named levels: {spec}")
        return spec
    if level not in levels:
        raise ConfigError(f"the code spec is hierarchical with levels {sorted(levels)}; "
                          f"choose the one this prior models with level=NAME (got {level!r})")
    outer = {k: v for k, v in spec.items() if k != "levels"}
    return {**outer, **levels[level]}


@dataclass(frozen=True)
class CodeLayout:
    """The shape of one sample's codes and how they flatten into a token sequence."""

    grid: tuple[int, ...]
    depth: int | None
    codebook_size: int | None
    continuous_dim: int | None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> CodeLayout:
        if "grid" not in spec:
            raise ConfigError(f"code_spec lacks 'grid': got {dict(spec)}")
        cont = spec.get("continuous") or {}
        dim = spec.get("continuous_dim") or (cont.get("dim") if isinstance(cont, Mapping) else None)
        size = spec.get("codebook_size")
        if not dim and not size:
            raise ConfigError(f"code_spec needs a codebook_size (discrete) or continuous.dim: got {dict(spec)}")
        return cls(tuple(int(g) for g in spec["grid"]), int(spec["depth"]) if spec.get("depth") else None,
                   int(size) if size and not dim else None, int(dim) if dim else None)

    @property
    def continuous(self) -> bool:
        return self.continuous_dim is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample: ``(*grid)``, ``(*grid, depth)`` or, continuous, ``(*grid[, depth], dim)``."""
        tail = ((self.depth,) if self.depth else ()) + ((self.continuous_dim,) if self.continuous else ())
        return self.grid + tail

    @property
    def seq_len(self) -> int:
        return math.prod(self.grid) * (self.depth or 1)

    def flatten(self, codes: Tensor) -> Tensor:
        """``(B, *shape) -> (B, N)`` (long) or ``(B, N, dim)`` (continuous)."""
        if tuple(codes.shape[1:]) != self.shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not match the code spec {(-1, *self.shape)}")
        if self.continuous:
            return codes.reshape(codes.shape[0], self.seq_len, self.continuous_dim).float()
        return codes.reshape(codes.shape[0], -1).long()

    def unflatten(self, flat: Tensor) -> Tensor:
        return flat.reshape(flat.shape[0], *self.shape)
