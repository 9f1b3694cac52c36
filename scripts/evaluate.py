#!/usr/bin/env python
"""Evaluate a checkpoint: ``python scripts/evaluate.py runs/vqgan/checkpoints/last.ckpt [--json out.json]``."""

import sys

from tokenforge.cli import run

if __name__ == "__main__":
    sys.exit(run("evaluate", sys.argv[1:]))
