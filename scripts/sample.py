#!/usr/bin/env python
"""Sample from a prior: ``python scripts/sample.py runs/ar/checkpoints/last.ckpt -n 64 [--class 3]``."""

import _checkout  # noqa: F401  (first: this checkout's packages, the stdlib's tokenize; see scripts/_checkout.py)

from tokenforge.cli import main

main("sample")
