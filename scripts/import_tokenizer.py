#!/usr/bin/env python
"""A diffusers VQModel or taming VQGAN as a tokenforge checkpoint.

``python scripts/import_tokenizer.py --diffusers DIR --out OUT.ckpt`` (see tokenforge/import_tokenizer.py).
"""

import _checkout  # noqa: F401  (first: this checkout's packages, the stdlib's tokenize; see scripts/_checkout.py)

from tokenforge.cli import main

main("import_tokenizer")
