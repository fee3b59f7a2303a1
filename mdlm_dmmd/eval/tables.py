"""Result tables: rows (plain dicts, one per scored draw) to `results.csv` and Markdown, and the
`report.md` + `metrics.json` of a single run (mode=train and mode=eval).

Study and sweep write their `results.csv` and Markdown tables with these same functions; what
differs between them is only which columns they choose and in which order.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable


def write_csv(path: Path, rows: Iterable[dict], columns: list[str]) -> None:
    """`rows` as CSV with `columns` in this order (cells a row lacks are blank, keys a row has
    beyond them are left out)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(header: list[str], cells: Iterable[list[str]]) -> list[str]:
    """The lines of a Markdown table: `header`, then one line per list of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return lines


def as_number(value: Any) -> float | None:
    """A cell read as a finite float, or None for blanks, None and NaN (missing cells)."""
    if value is None or value == "":
        return None
    value = float(value)
    return None if math.isnan(value) else value


def number(value: Any) -> str:
    """A table cell: floats to 4 significant digits, anything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def value_stderr(value: float | None, stderr: float | None = None) -> str:
    """"12.35 ± 0.41" (or "12.35" without an error, "" without a value)."""
    if value is None:
        return ""
    return f"{value:.4g}" if stderr is None else f"{value:.4g} ± {stderr:.2g}"


def shown_columns(columns: list[str]) -> list[str]:
    """`columns` without the `<c>_stderr` ones whose `<c>` is there too: a Markdown table shows
    each such pair as one "value ± error" cell (`cell`)."""
    present = set(columns)
    return [c for c in columns if not (c.endswith("_stderr") and c[: -len("_stderr")] in present)]


def cell(row: dict, column: str) -> str:
    """`row[column]` as a table cell, "value ± error" when the row has `<column>_stderr`."""
    value = row.get(column, "")
    error = as_number(row.get(f"{column}_stderr"))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and error is not None:
        return value_stderr(float(value), error)
    return number(value)


def write_report(run_dir: Path, title: str, rows: dict[str, Any], files: list[str]) -> None:
    """`report.md` (a quantity | value table and the files written) and `metrics.json` of a run."""
    cells = []
    for key, value in rows.items():
        if isinstance(value, dict) and "value" in value:  # a metric; its stderr may be missing or None
            error = value.get("stderr")
            value = f"{value['value']:.4f}" + ("" if error is None else f" ± {error:.4f}")
        elif isinstance(value, float):
            value = f"{value:.4f}"
        cells.append([str(key), str(value)])
    lines = [f"# {title}", "", *markdown_table(["quantity", "value"], cells)]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files), ""]
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    (run_dir / "metrics.json").write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")
