"""Resuming a sweep from its `results.csv` (`sweep.resume`, on by default).

`results.csv` is rewritten after every row, so a sweep that dies keeps what it measured; run
again in the same run_dir, it keeps those rows and measures only the missing ones. A row is kept
when its method, steps, top-p values, temperature and checkpoint path match and the folder's
`config.yaml` has the same `data`, `sampling`, `eval` and `sweep.num_samples`; other settings
there are an error, never a silent mix (a checkpoint retrained at the same path is not noticed:
use `sweep.resume=false`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mdlm_dmmd.errors import UserError

RESUME_KEYS = ("method", "steps", "distill_top_p", "top_p", "temperature", "checkpoint")  # a row's identity
RESUME_SETTINGS = ("data", "sampling", "eval", "sweep.num_samples")  # what its numbers depend on
TEXT_COLUMNS = ("method", "label", "source", "checkpoint", "note")
INT_COLUMNS = ("steps", "num_samples", "nfe", "entropy_redraws")  # written as ints: read back as ints


def _first_difference(old: Any, new: Any, key: str) -> str | None:
    """The first dotted key under which two plain containers differ, or None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{key}.{k}")
            if found:
                return found
        return None
    return None if old == new else f"{key} ({old!r} there, {new!r} now)"


def resume_key(row: dict) -> tuple[str, ...]:
    # compared as written to the CSV: str() of the measured values, the cells as read back
    return tuple(str(row.get(k, "")) for k in RESUME_KEYS)


def _parse_cell(column: str, cell: str) -> Any:
    if cell == "" or column in TEXT_COLUMNS:
        return cell
    if column in INT_COLUMNS:
        return int(cell)
    try:
        return float(cell)
    except ValueError:
        return cell


def measured_rows(cfg: DictConfig, run_dir: Path) -> dict[tuple[str, ...], dict]:
    """Rows a previous run of this sweep already measured in run_dir (empty when there are none
    or `sweep.resume` is off); a folder holding a sweep with other settings is an error."""
    results, saved = run_dir / "results.csv", run_dir / "config.yaml"
    if not cfg.sweep.resume or not results.is_file():
        return {}
    hint = "use another run_dir, or sweep.resume=false to measure every row again"
    if not saved.is_file():
        raise UserError(f"run_dir '{run_dir}' holds results.csv but no config.yaml to check its settings; {hint}")
    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    new = OmegaConf.to_container(cfg, resolve=True)
    for dotted in RESUME_SETTINGS:
        a, b = old, new
        for part in dotted.split("."):
            a, b = (a or {}).get(part, "<missing>"), (b or {}).get(part, "<missing>")
        difference = _first_difference(a, b, dotted)
        if difference:
            raise UserError(f"run_dir '{run_dir}' holds a sweep made with other settings: {difference}; {hint}")
    with open(results, newline="", encoding="utf-8") as f:
        return {resume_key(row): {k: _parse_cell(k, v or "") for k, v in row.items() if k != "label"}
                for row in csv.DictReader(f) if row.get("source") in ("measured", "data")}
