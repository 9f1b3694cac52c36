#!/usr/bin/env python
"""Train a tokenizer or a prior: ``python scripts/train.py configs/vqgan.yaml [key=value ...]``."""

import sys

from tokenforge.cli import run

if __name__ == "__main__":
    sys.exit(run("train", sys.argv[1:]))
