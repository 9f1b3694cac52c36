"""Sampling options, declared once per prior; the commands build their command-line flags from them.

A prior lists its options in the class attribute ``sampling_options`` (name, type, default, help, and
optionally a shorter command-line flag). ``sample(n, cond, generator=..., **options)`` accepts exactly
those names, and ``tokenforge sample`` / ``evaluate`` add one flag per option with
:func:`add_sampling_flags` and hand the values the user gave to ``sample`` with :func:`sampling_kwargs`.
The options every token sampler shares (temperature, top-k, top-p, guidance) are defined here once.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingOption:
    """One keyword of a prior's ``sample``: its type, default and help, and its command-line flag.

    ``flag`` defaults to ``--name`` with dashes (``top_k`` -> ``--top-k``); ``type`` is ``bool`` for
    switches (``--flag`` / ``--no-flag``), else the callable that parses (and range-checks) the
    command-line string.
    """

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    flag: str | None = None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


def _number(kind: type, text: str, low: float, strict: bool, allow_none: bool) -> Any:
    """Parse ``text`` as ``kind`` no smaller than ``low`` (strictly above with ``strict``); ``"none"`` -> None."""
    if allow_none and text.lower() == "none":
        return None
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
    return value


def non_negative_float(text: str) -> float:
    return _number(float, text, 0.0, strict=False, allow_none=False)


def positive_int(text: str) -> int:
    return _number(int, text, 1, strict=False, allow_none=False)


def optional_positive_int(text: str) -> int | None:
    """``"none"`` switches the option off (lets a flag undo a default that is set)."""
    return _number(int, text, 1, strict=False, allow_none=True)


def optional_int(text: str) -> int | None:
    """``"none"`` -> None, else any int."""
    return None if text.lower() == "none" else int(text)


def optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def optional_probability(text: str) -> float | None:
    value = _number(float, text, 0.0, strict=True, allow_none=True)
    if value is not None and value > 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


TEMPERATURE = SamplingOption("temperature", non_negative_float, 1.0, "softmax temperature (0 = greedy)")
TOP_K = SamplingOption("top_k", optional_positive_int, None, "sample only among the k most likely codes")
TOP_P = SamplingOption("top_p", optional_probability, None, "nucleus sampling: smallest set of codes with this mass")
CFG_SCALE = SamplingOption("cfg_scale", non_negative_float, 0.0,
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
