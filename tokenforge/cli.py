"""Entry points shared by ``scripts/*.py`` and the console commands: one-line errors, no tracebacks.

``python scripts/train.py ...`` (runs the checkout that holds the script, see ``scripts/_checkout.py``)
and the installed ``tokenforge-train ...`` (``[project.scripts]`` in ``pyproject.toml``; runs the
installed checkout) both end in :func:`main`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from data.codes import CodeFileError
from layers.instantiate import ConfigError
from stage1.tokenizer import CheckpointKindError, CorruptCheckpointError
from tokenforge.run_lock import RunFolderLockedError

COMMANDS = {"train": "tokenforge.train", "tokenize": "tokenforge.tokenize", "sample": "tokenforge.sample",
            "evaluate": "tokenforge.evaluate", "import_tokenizer": "tokenforge.import_tokenizer"}

# Errors that mean "the input is wrong": print the message (which names the fix) and exit 2. Our code
# raises ValueError subclasses for bad values (configs, data, checkpoints), so ValueError counts too;
# TOKENFORGE_DEBUG=1 shows the traceback when one of them is a bug rather than bad input.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, CheckpointKindError, CorruptCheckpointError, CodeFileError, RunFolderLockedError,
    FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError,
)


def run(command: str, argv: Sequence[str]) -> int:
    """Run ``command`` with ``argv``; a user error prints one line (plus the debug hint) and returns 2."""
    module = importlib.import_module(COMMANDS[command])
    try:
        module.main(list(argv))
    except USER_ERRORS as err:
        if os.environ.get("TOKENFORGE_DEBUG"):
            raise
        print(f"error: {err}\n(set TOKENFORGE_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    return 0


def main(command: str) -> None:
    """``scripts/<command>.py``: run with the process's arguments and exit with the status."""
    sys.exit(run(command, sys.argv[1:]))


def train() -> None:
    main("train")


def tokenize() -> None:
    main("tokenize")


def sample() -> None:
    main("sample")


def evaluate() -> None:
    main("evaluate")


def import_tokenizer() -> None:
    main("import_tokenizer")


# -- argument types: refuse nonsense while parsing, before any model is loaded ------------------------
def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``-n 0`` and ``--batch-size 0`` fail at once, naming the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0 (a guidance scale below 0 is refused, not silently used)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value
