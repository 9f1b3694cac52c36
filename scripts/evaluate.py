#!/usr/bin/env python
"""Evaluate a checkpoint: ``python scripts/evaluate.py runs/vqgan/checkpoints/last.ckpt [--json out.json]``."""

import _checkout  # noqa: F401  (first: this checkout's packages, the stdlib's tokenize; see scripts/_checkout.py)

from tokenforge.cli import main

main("evaluate")
