"""What the experts of an MoE model learned, for ``evaluate``'s report: numbers and plots.

From a :class:`layers.moe.RoutingRecorder` filled during evaluation and the load history that
training kept in the checkpoint (:class:`tokenforge.callbacks.MoELoadHistory`), per MoE layer:

- results: ``moe/<layer>/load_max_over_mean`` (1 = perfectly balanced), ``router_entropy`` (nats),
  ``dropped_fraction`` (capacity drops), ``class_mi_bits`` / ``value_mi_bits`` (mutual information
  between the expert chosen and the sample's class / the token's code value: 0 = routing ignores it);
- plots: per-expert load over training, routing heatmaps expert x class, expert x code value (the
  most frequent values) and expert x position (a tokenizer's spatial positions), and the entropy and
  drop rate over training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data.atomic import atomic_write
from layers.moe.recording import RoutingRecorder, mutual_information_bits

MAX_VALUES_SHOWN = 32  # code values in the expert x value heatmap (the most frequent ones)


def load_history(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The MoE load history a training run stored in its checkpoint, or None."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("MoELoadHistory") and isinstance(state, dict):
            history = state.get("history") or {}
            return history if history.get("steps") else None
    return None


def routing_results(recorder: RoutingRecorder) -> dict[str, float]:
    results: dict[str, float] = {}
    for name, tally in recorder.items():
        if tally.forwards == 0:
            continue
        load = tally.load.double()
        results[f"moe/{name}/load_max_over_mean"] = float(load.max() / load.mean().clamp_min(1e-12))
        results[f"moe/{name}/router_entropy"] = tally.mean_entropy
        results[f"moe/{name}/dropped_fraction"] = tally.mean_dropped
        if tally.by_class is not None:
            results[f"moe/{name}/class_mi_bits"] = mutual_information_bits(tally.by_class)
        if tally.by_value is not None:
            results[f"moe/{name}/value_mi_bits"] = mutual_information_bits(tally.by_value)
    return results


def _row_normalised(table: Tensor) -> Tensor:
    return table.double() / table.sum(1, keepdim=True).clamp_min(1)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    finally:
        plt.close(fig)


def _heatmaps(tables: dict[str, Tensor], row_label: str, path: Path, row_names: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tables)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.6), squeeze=False)
    for ax, (name, table) in zip(axes[0], tables.items()):
        im = ax.imshow(_row_normalised(table).numpy(), aspect="auto", cmap="viridis", vmin=0)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("expert")
        ax.set_ylabel(row_label)
        if row_names is not None and len(row_names) <= 40:
            ax.set_yticks(range(len(row_names)), row_names, fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.046, label=f"share of the {row_label}'s assignments")
    return _save(fig, path)


def _value_table(table: Tensor) -> tuple[Tensor, list[str]]:
    """The rows of the most frequent values, in value order."""
    totals = table.sum(1)
    keep = totals.topk(min(MAX_VALUES_SHOWN, int((totals > 0).sum()))).indices.sort().values
    return table[keep], [str(int(v)) for v in keep]


def _history_plot(history: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = history["layers"]
    n = len(layers)
    fig, axes = plt.subplots(2, n, figsize=(3.4 * n + 1, 5.2), squeeze=False)
    steps = history["steps"]
    for col, (name, series) in enumerate(layers.items()):
        load = torch.tensor(series["load"], dtype=torch.float64)  # (records, E)
        ax = axes[0][col]
        if load.dim() == 2:
            for e in range(load.shape[1]):
                ax.plot(steps[: len(load)], load[:, e].numpy(), lw=1)
            ax.axhline(1.0 / load.shape[1], color="k", ls=":", lw=0.8)
        ax.set_title(f"{name}: load per expert", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("fraction of assignments")
        ax = axes[1][col]
        ax.plot(steps[: len(series["router_entropy"])], series["router_entropy"], label="router entropy (nats)")
        if any(v == v and v > 0 for v in series.get("dropped_fraction", [])):
            ax.plot(steps[: len(series["dropped_fraction"])], series["dropped_fraction"], label="dropped fraction")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    return _save(fig, path)


def routing_plots(recorder: RoutingRecorder, history: dict[str, Any] | None, out_dir: Path,
                  class_names: list[str] | None = None) -> dict[str, Path]:
    """Write the plots that have data; returns {report title: path}."""
    plots: dict[str, Path] = {}
    if history:
        plots["MoE: per-expert load, router entropy and drop rate over training"] = _history_plot(
            history, out_dir / "moe_load_history.png")
    tallies = {name: t for name, t in recorder.items() if t.forwards}
    by_class = {n: t.by_class for n, t in tallies.items() if t.by_class is not None}
    if by_class:
        rows = max(t.shape[0] for t in by_class.values())
        names = class_names[:rows] if class_names and len(class_names) >= rows else None
        plots["MoE routing: expert x class"] = _heatmaps(
            {n: _pad_rows(t, rows) for n, t in by_class.items()}, "class", out_dir / "moe_expert_by_class.png", names)
    by_value = {n: t.by_value for n, t in tallies.items() if t.by_value is not None}
    if by_value:
        shown = {n: _value_table(t) for n, t in by_value.items()}
        first_names = next(iter(shown.values()))[1]
        plots["MoE routing: expert x code value (most frequent values)"] = _heatmaps(
            {n: t for n, (t, _) in shown.items()}, "code value", out_dir / "moe_expert_by_value.png",
            first_names if len(shown) == 1 else None)
    by_position = {n: t.position for n, t in tallies.items() if t.position is not None}
    if by_position:
        plots["MoE routing: expert x position"] = _heatmaps(by_position, "position",
                                                            out_dir / "moe_expert_by_position.png")
    return plots


def _pad_rows(table: Tensor, rows: int) -> Tensor:
    if table.shape[0] >= rows:
        return table
    return torch.cat([table, table.new_zeros(rows - table.shape[0], table.shape[1])])
