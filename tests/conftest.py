"""Shared fixtures: deterministic seeds, few threads, isolated caches."""

from __future__ import annotations

import os

import pytest
import torch

# Keep the suite reproducible and friendly to 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture()
def run_root(tmp_path):
    """A fresh parent folder for run folders."""
    d = tmp_path / "runs"
    d.mkdir()
    return d
