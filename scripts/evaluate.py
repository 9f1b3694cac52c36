#!/usr/bin/env python
"""Evaluate a checkpoint: ``python scripts/evaluate.py runs/vqgan/checkpoints/last.ckpt [--json out.json]``."""

import os
import sys

# scripts/tokenize.py shares its name with the standard library's `tokenize` (imported by inspect,
# linecache, ...); with this folder first on sys.path every script would import it by mistake.
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from tokenforge.cli import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run("evaluate", sys.argv[1:]))
