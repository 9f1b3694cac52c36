"""The markdown evaluation report: a metrics table, the notes (which features, what was skipped), plots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from data.atomic import atomic_write_text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def is_rows(value: Any) -> bool:
    """A result that is a table of its own: a non-empty list of dicts with the same keys (e.g. a bitrate table)."""
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) and r.keys() == value[0].keys()
                                                            for r in value)


def rows_table(rows: list[dict[str, Any]]) -> str:
    """Rows (dicts with the same keys) as a markdown table, one column per key."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(_fmt(v) for v in row.values()) + " |" for row in rows])


def write_report(path: Path, results: dict[str, Any], plots: dict[str, Path]) -> Path:
    lines = [f"# Evaluation of `{results['checkpoint']}`", "", f"Kind: {results['kind']}; real split: "
             f"{results['split']}.", "", "| metric | value |", "| --- | --- |"]
    for k, v in results.items():
        if k in ("checkpoint", "kind", "split", "notes", "plots") or is_rows(v):
            continue
        lines.append(f"| {k} | {_fmt(v)} |")
    for k, v in results.items():  # tables of their own (e.g. an audio codec's bitrate_table)
        if is_rows(v):
            lines += ["", f"## {k}", "", rows_table(v)]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in results.get("notes", [])]
    for title, plot in plots.items():
        rel = os.path.relpath(plot, path.parent)
        lines += ["", f"## {title[0].upper()}{title[1:]}", "", f"![{title}]({rel})"]
    return atomic_write_text(path, "\n".join(lines) + "\n")
