"""Sampling options, declared once per prior; the commands build their command-line flags from them.

A prior lists its options in the class attribute ``sampling_options`` (name, type, default, help, and
optionally a shorter command-line flag). ``sample(n, cond, generator=..., **options)`` accepts exactly
those names, and ``tokenforge sample`` / ``evaluate`` add one flag per option with
:func:`add_sampling_flags` and hand the values the user gave to ``sample`` with :func:`sampling_kwargs`.
The options every token sampler shares (temperature, top-k, top-p, guidance) are defined here once.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingOption:
    """One keyword of a prior's ``sample``: its type, default and help, and its command-line flag.

    ``flag`` defaults to ``--name`` with dashes (``top_k`` -> ``--top-k``); ``type`` is ``bool`` for
    switches (``--flag`` / ``--no-flag``), else the callable that parses the command-line string.
    """

    name: str
    type: type
    default: Any
    help: str
    flag: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def optional_int(text: str) -> int | None:
    """``"none"`` -> None, else an int (lets a flag switch off an option whose default is set)."""
    return None if text.lower() == "none" else int(text)


def optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


TEMPERATURE = SamplingOption("temperature", float, 1.0, "softmax temperature (0 = greedy)")
TOP_K = SamplingOption("top_k", optional_int, None, "sample only among the k most likely codes")
TOP_P = SamplingOption("top_p", optional_float, None, "nucleus sampling: smallest set of codes with this mass")
CFG_SCALE = SamplingOption("cfg_scale", float, 0.0,
                           "classifier-free guidance: cond + s * (cond - uncond); 0 = none", flag="--cfg")
TOKEN_SAMPLING = (TEMPERATURE, TOP_K, TOP_P, CFG_SCALE)


def add_sampling_flags(parser: argparse.ArgumentParser, options: Iterable[SamplingOption],
                       title: str = "sampling options") -> None:
    """Add one flag per option; an unset flag stays ``None`` so the prior's own default applies."""
    group = parser.add_argument_group(title)
    for opt in options:
        help_text = f"{opt.help} (default {opt.default})"
        if opt.type is bool:
            group.add_argument(opt.cli_flag, dest=opt.name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(opt.cli_flag, dest=opt.name, type=opt.type, default=None, help=help_text)


def sampling_kwargs(args: argparse.Namespace, options: Sequence[SamplingOption]) -> dict[str, Any]:
    """The options the user gave on the command line, as keywords of ``sample``."""
    return {o.name: getattr(args, o.name) for o in options if getattr(args, o.name, None) is not None}


def check_sample_signature(cls: type, options: Sequence[SamplingOption]) -> None:
    """Refuse a prior whose ``sample`` lacks a declared option (the declaration and the code drifted)."""
    import inspect

    params = inspect.signature(cls.sample).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [o.name for o in options if o.name not in params]
    if missing:
        raise TypeError(f"{cls.__qualname__}.sample does not accept its declared sampling options {missing}")
