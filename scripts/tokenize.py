#!/usr/bin/env python
"""Encode a dataset into code files: ``python scripts/tokenize.py TOKENIZER_CKPT --out codes/NAME``."""

import _checkout  # noqa: F401  (first: this checkout's packages, the stdlib's tokenize; see scripts/_checkout.py)

from tokenforge.cli import main

main("tokenize")
