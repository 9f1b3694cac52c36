"""Entry points shared by ``scripts/*.py``: clean one-line errors for user mistakes, no tracebacks."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from layers.instantiate import ConfigError

COMMANDS = {"train": "tokenforge.train", "tokenize": "tokenforge.tokenize", "sample": "tokenforge.sample",
            "evaluate": "tokenforge.evaluate"}

# Errors that mean "the input is wrong": print the message (which names the fix) and exit 2. Our code
# raises ValueError subclasses for bad values (configs, data, checkpoints), so ValueError counts too;
# TOKENFORGE_DEBUG=1 shows the traceback when one of them is a bug rather than bad input.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, NotADirectoryError, ValueError)


def _user_errors() -> tuple[type[BaseException], ...]:
    extra: list[type[BaseException]] = []
    for mod, name in (("stage1.tokenizer", "CheckpointKindError"), ("data.codes", "CodeFileError")):
        try:
            extra.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return USER_ERRORS + tuple(extra)


def run(command: str, argv: Sequence[str]) -> int:
    module = importlib.import_module(COMMANDS[command])
    try:
        module.main(list(argv))
    except _user_errors() as err:
        if os.environ.get("TOKENFORGE_DEBUG"):
            raise
        print(f"error: {err}\n(set TOKENFORGE_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 2
    return 0
