#!/usr/bin/env python
"""``python scripts/tokenize.py --help`` for usage."""

import sys

from tokenforge.cli import run

if __name__ == "__main__":
    sys.exit(run("tokenize", sys.argv[1:]))
