#!/usr/bin/env python
"""Train a tokenizer or a prior: ``python scripts/train.py configs/vqgan.yaml [key=value ...]``."""

import _checkout  # noqa: F401  (first: this checkout's packages, the stdlib's tokenize; see scripts/_checkout.py)

from tokenforge.cli import main

main("train")
