"""Prior sampling flags shared by ``sample`` and ``evaluate`` (so neither imports the other).

Flags are declared once here with types that refuse nonsense while parsing (``--cfg -1``,
``--top-k 0``), and only the flags the user gave are passed to ``Prior.sample``; a flag the prior's
``sample`` does not take is refused, naming the ones it does.
"""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from tokenforge.cli import non_negative_float, positive_int

# CLI flag -> (keyword of Prior.sample, argparse type, help)
SAMPLING_FLAGS: dict[str, tuple[str, Any, str]] = {
    "cfg": ("cfg_scale", non_negative_float, "classifier-free guidance scale (0 = none)"),
    "temperature": ("temperature", non_negative_float, "softmax temperature"),
    "top_k": ("top_k", positive_int, "keep the k most likely codes"),
    "top_p": ("top_p", non_negative_float, "nucleus sampling mass"),
    "steps": ("steps", positive_int, "decoding steps (MaskGIT)"),
    "choice_temperature": ("choice_temperature", non_negative_float, "re-masking temperature (MaskGIT)"),
}


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    for flag, (_, kind, help_text) in SAMPLING_FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=None, help=help_text)


def sampling_kwargs(prior: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The keywords for ``prior.sample`` from the flags the user gave."""
    accepted = inspect.signature(prior.sample).parameters
    kwargs: dict[str, Any] = {}
    for flag, (key, _, _) in SAMPLING_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if key not in accepted:
            valid = [f"--{f.replace('_', '-')}" for f, (k, _, _) in SAMPLING_FLAGS.items() if k in accepted]
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to {type(prior).__name__}; "
                             f"its sampling options are {', '.join(valid)}")
        kwargs[key] = value
    return kwargs
