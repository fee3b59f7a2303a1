"""Rows quoted from the literature (`sweep.literature_csv`): numbers copied from papers, marked
"(quoted)" in the tables and drawn with an `x` marker, never mistaken for something measured."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from mdlm_dmmd import registry
from mdlm_dmmd.errors import UserError

LITERATURE_KEYS = ("method", "steps", "distill_top_p", "top_p", "temperature", "note")


def read_literature(path: str, metrics: list[str]) -> list[dict]:
    """Rows of a CSV of quoted numbers (columns: method, steps, metric names, `<metric>_stderr`,
    optionally distill_top_p, top_p, temperature, note); blanks are missing values."""
    accepted_metrics = sorted(set(registry.plugins(registry.METRIC_GROUP)) | set(metrics))
    with open(Path(path).expanduser(), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        records = list(reader)
    accepted = set(LITERATURE_KEYS) | set(accepted_metrics) | {f"{m}_stderr" for m in accepted_metrics}
    unknown = [c for c in columns if c not in accepted]
    if "method" not in columns or "steps" not in columns or unknown:
        problem = f"unknown column(s) {', '.join(unknown)}" if unknown else "columns 'method' and 'steps' are required"
        raise UserError(f"sweep.literature_csv '{path}': {problem}; accepted: method, steps, "
                        f"distill_top_p, top_p, temperature, note, and metric names ({', '.join(accepted_metrics)}) "
                        f"with optional <metric>_stderr")
    rows = []
    for line, record in enumerate(records, start=2):
        record = {k.strip(): (v or "").strip() for k, v in record.items() if k is not None}
        row: dict[str, Any] = {"method": record["method"], "source": "quoted", "note": record.get("note", "")}
        if not row["method"]:
            raise UserError(f"sweep.literature_csv '{path}' line {line}: method is empty")
        for key, value in record.items():
            if key in ("method", "note") or value == "":
                continue
            try:
                number = float(value)
            except ValueError as err:
                raise UserError(f"sweep.literature_csv '{path}' line {line}: {key} must be a number, got '{value}'") from err
            if key == "steps":
                if number != int(number) or number < 1:
                    raise UserError(f"sweep.literature_csv '{path}' line {line}: steps must be an int >= 1, got '{value}'")
                number = int(number)
            row[key] = number
        rows.append(row)
    return rows


def metric_columns(metrics: list[str], quoted: list[dict]) -> list[str]:
    """The metric names of the tables: `eval.metrics`, then any only quoted, in order."""
    names = list(metrics)
    for row in quoted:
        names += [k for k in row if k not in LITERATURE_KEYS and k not in ("source", "label")
                  and not k.endswith("_stderr") and k not in names]
    return names
