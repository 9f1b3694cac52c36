"""The codebook usage histogram as a PNG (written atomically), for training callbacks and ``evaluate``."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from data.atomic import atomic_write
from metrics.codebook import histogram_stats


def save_usage_histogram(counts: Tensor, path: str | Path, title: str = "codebook usage") -> Path:
    """Bar plot of code counts sorted by frequency (log scale), with usage and perplexity in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = counts.float().reshape(-1)
    stats = histogram_stats(counts)
    used, perplexity = stats["usage"].item(), stats["perplexity"].item()
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
