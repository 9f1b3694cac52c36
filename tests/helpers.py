"""Test helpers: run the train command in-process and read its CSV log."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LOSS_KEYS = ("train/loss", "train/rec_loss")


def train(config: str | Path, runs: Path, overrides: Sequence[str] = (), name: str | None = None):
    from tokenforge.train import main

    argv = [str(config), "--runs", str(runs), *overrides]
    if name:
        argv += ["--name", name]
    return main(argv)


def logged_series(run_dir: Path, keys: Sequence[str] = LOSS_KEYS) -> tuple[str, list[float]]:
    """The first of ``keys`` that the run logged, as a list of finite-or-not floats in step order."""
    rows = list(csv.DictReader(open(run_dir / "logs" / "csv" / "metrics.csv")))
    for key in keys:
        values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
        if values:
            return key, values
    raise AssertionError(f"none of {keys} was logged in {run_dir}")


def assert_finite_and_falling(values: Sequence[float], what: str) -> None:
    assert len(values) >= 4, f"{what}: too few logged values ({len(values)})"
    assert all(math.isfinite(v) for v in values), f"{what}: non-finite loss {values}"
    k = max(2, len(values) // 3)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    assert last < first, f"{what}: loss did not fall (first {first:.4f} -> last {last:.4f}): {values}"
