"""Imported first by every ``scripts/*.py``: run this checkout's code, and keep the stdlib's ``tokenize``.

Two problems, one answer, in one place:

* ``python scripts/X.py`` puts ``scripts/`` first on ``sys.path``, where ``scripts/tokenize.py``
  would shadow the standard library's ``tokenize`` (which ``inspect``, ``linecache`` and torch import).
  This module removes ``scripts/`` from ``sys.path`` (it was only needed to find this file).
* With two checkouts (worktrees), the editable install points at one of them; without help, a script
  of the other one would import the first one's packages. This module puts the checkout that holds
  the script first on ``sys.path``, ahead of the editable install's finder, so a script always runs
  the code next to it.

The installed console commands (``tokenforge-train`` etc., see ``pyproject.toml``) run the installed
checkout; the scripts run their own.
"""

import os
import sys

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(SCRIPTS)

sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) not in (SCRIPTS, CHECKOUT)]
sys.path.insert(0, CHECKOUT)
