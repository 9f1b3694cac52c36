"""Saving image grids and usage histograms as PNG files (written atomically)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from data.atomic import atomic_write


def to_uint8(x: Tensor) -> Tensor:
    """``[-1, 1]`` float images -> uint8 ``[0, 255]``."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """Save ``(N, C, H, W)`` images in ``[-1, 1]`` as one PNG grid; returns the path."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(((images.float().clamp(-1, 1) + 1) / 2), nrow=max(1, nrow), padding=padding, pad_value=1.0)
    arr = (grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


def save_usage_histogram(counts: Tensor, path: str | Path, title: str = "codebook usage") -> Path:
    """Bar plot of code counts sorted by frequency (log scale), with usage and perplexity in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = counts.float().reshape(-1)
    probs = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()).item()
    used = (counts > 0).float().mean().item()
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.bar(range(len(counts)), counts.sort(descending=True).values.numpy(), width=1.0)
    ax.set_yscale("symlog")
    ax.set_xlabel("code rank (sorted by frequency)")
    ax.set_ylabel("count")
    ax.set_title(f"{title}: {used:.1%} used, perplexity {perplexity:.1f} of {len(counts)}")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
