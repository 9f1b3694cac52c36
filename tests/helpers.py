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


def train_and_tokenize(root: Path, config: str, overrides: Sequence[str] = (), name: str = "tok",
                       shard_size: int = 64, batch_size: int = 32) -> tuple[Path, Path]:
    """Train ``configs/smoke/<config>.yaml`` into ``root/runs/<name>`` and tokenize its data into
    ``root/codes``: (checkpoint, code folder)."""
    from tokenforge.tokenize import main as tokenize

    train(CONFIGS / "smoke" / f"{config}.yaml", root / "runs", overrides, name=name)
    ckpt = root / "runs" / name / "checkpoints" / "last.ckpt"
    codes = root / "codes"
    tokenize([str(ckpt), "--out", str(codes), "--shard-size", str(shard_size), "--batch-size", str(batch_size)])
    return ckpt, codes


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


SYNTHETIC_SPEC = {"grid": [3, 3], "depth": None, "codebook_size": 12, "continuous_dim": None}


def write_synthetic_code_folder(folder: Path, n_train: int = 128, n_val: int = 32) -> None:
    """A tiny labelled code folder (3x3 codes of 12, 3 classes) through the real writer:
    class-dependent patterns plus 10% noise, so a prior has something to learn."""
    import torch

    from data.codes import CodeWriter

    writer = CodeWriter(folder, SYNTHETIC_SPEC, tokenizer_path="none.ckpt", tokenizer_sha256="0" * 64, shard_size=64)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        labels = torch.arange(n) % 3
        codes = (torch.arange(9)[None] * (labels[:, None] + 1)) % 12
        noise = torch.rand(n, 9, generator=g) < 0.1
        codes = torch.where(noise, torch.randint(0, 12, (n, 9), generator=g), codes).view(n, 3, 3)
        for i in range(0, n, 64):
            writer.write_shard(split, i // 64, codes[i : i + 64], labels[i : i + 64])
    writer.finalize()


def taming_adaptive_weight(nll_loss, g_loss, last_layer, max_weight: float = 1e4):
    """VQGAN's adaptive GAN weight computed as taming-transformers does (Esser et al., 2021): both losses
    back-propagated to the decoder's last layer, ``||grad nll|| / (||grad g|| + 1e-4)`` clamped to
    ``[0, max_weight]``, detached. The reference the one-pass generator step is tested against."""
    import torch

    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
