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


def write_report(path: Path, results: dict[str, Any], plots: dict[str, Path]) -> Path:
    lines = [f"# Evaluation of `{results['checkpoint']}`", "", f"Kind: {results['kind']}; real split: "
             f"{results['split']}.", "", "| metric | value |", "| --- | --- |"]
    for k, v in results.items():
        if k in ("checkpoint", "kind", "split", "notes", "plots"):
            continue
        lines.append(f"| {k} | {_fmt(v)} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in results.get("notes", [])]
    for title, plot in plots.items():
        rel = os.path.relpath(plot, path.parent)
        lines += ["", f"## {title[0].upper()}{title[1:]}", "", f"![{title}]({rel})"]
    return atomic_write_text(path, "\n".join(lines) + "\n")
