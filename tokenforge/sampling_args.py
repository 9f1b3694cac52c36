"""Prior sampling flags shared by ``sample`` and ``evaluate`` (so neither imports the other).

Each prior declares its sampling options once (``Prior.sampling_options``: name, type, default,
help); the flags are built from the declaration of the prior whose checkpoint the command line
names, with types that refuse nonsense while parsing (``--cfg -1``, ``--top-k 0``). Without a
readable prior checkpoint (``--help`` alone, a typo) the options every token sampler shares are
offered. Only the flags the user gave are passed to ``Prior.sample``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from stage2.options import TOKEN_SAMPLING, SamplingOption
from stage2.options import add_sampling_flags as add_option_flags
from stage2.options import sampling_kwargs as option_kwargs
from stage2.prior import sampling_options_of


def prior_options_in(argv: Sequence[str] | None) -> tuple[SamplingOption, ...]:
    """The declared sampling options of the prior checkpoints among the arguments, each name once (flag
    values and other files, such as ``--tokenizer``, are not prior checkpoints and are passed over).
    Several priors (the levels of a VQ-VAE-2) offer the union; each takes the ones it declares."""
    import sys

    found: dict[str, SamplingOption] = {}
    for arg in sys.argv[1:] if argv is None else argv:
        for option in () if arg.startswith("-") else sampling_options_of(arg):
            found.setdefault(option.name, option)
    return tuple(found.values())


def add_sampling_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> None:
    """Add the sampling flags of the prior that ``argv`` names."""
    options = prior_options_in(argv) or TOKEN_SAMPLING
    add_option_flags(parser, options, title="sampling options (declared by the prior)")


def sampling_kwargs(prior: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The keywords for ``prior.sample`` from the flags the user gave."""
    options: Sequence[SamplingOption] = type(prior).sampling_options
    return option_kwargs(args, options)
