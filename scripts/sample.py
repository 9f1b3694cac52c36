#!/usr/bin/env python
"""``python scripts/sample.py --help`` for usage."""

import sys

from tokenforge.cli import run

if __name__ == "__main__":
    sys.exit(run("sample", sys.argv[1:]))
