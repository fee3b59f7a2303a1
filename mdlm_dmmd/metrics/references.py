"""One judge metric under several reference LMs: a verdict that holds under one reference only
is the reference's opinion, not the samples' quality.

`gradient_moment` and `gen_ppl` take `reference` as one spec (hub id, HF directory or `ar`
checkpoint), a list of specs, or a mapping label → spec. With one, the metric is what it always
was. With several, it measures under each: the first is primary (its numbers are the metric's
`value`/`stderr`, the column tables and plots show first), and every reference gets columns of
its own, `<prefix>_<label>` and `<prefix>_<label>_stderr` (e.g. `gm_ar_seed2`), so a table shows
whether a comparison holds under all of them.

A label is the mapping's key, or derived from the spec: a run's checkpoint
`RUN/checkpoints/final.ckpt` → `RUN`, another file → its stem, a hub id → its last part; then
characters other than letters, digits, `.`, `-` and `_` become `_`. Two specs with one label
are an error that asks for the mapping form.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mdlm_dmmd.errors import UserError


def label_of(spec: str) -> str:
    """A short column label for a reference spec (see the module docstring)."""
    path = Path(str(spec).rstrip("/"))
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        name = path.parent.parent.name
    elif path.suffix in (".ckpt", ".pt", ".safetensors"):
        name = path.stem
    else:
        name = path.name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "reference"


def reference_specs(value: Any, metric: str) -> dict[str, str]:
    """`reference` as label → spec, in the given order; a one-line UserError for anything else."""
    key = f"eval.metric_options.{metric}.reference"
    if isinstance(value, (str, Path)):
        return {label_of(str(value)): str(value)}
    if isinstance(value, Mapping):
        pairs = [(str(label), spec) for label, spec in value.items()]
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        pairs = [(label_of(str(spec)) if isinstance(spec, (str, Path)) else "", spec) for spec in value]
    else:
        pairs = []
    if not pairs or not all(isinstance(spec, (str, Path)) and str(spec).strip() for _, spec in pairs):
        raise UserError(f"{key} must be a reference (hub id, directory or `ar` checkpoint), a list of them "
                        f"or a mapping label: reference, got {value!r}")
    labels = [label for label, _ in pairs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"{key}: references {', '.join(str(s) for _, s in pairs)} share the column label "
                        f"'{repeated[0]}'; name them with a mapping, e.g. {{ar_a: PATH_A, ar_b: PATH_B}}")
    return {label: str(spec) for label, spec in pairs}


def all_specs(value: Any) -> list[str]:
    """Every reference spec in an option value (one, a list or a mapping), unchecked; for checks
    that must see each reference (a judge may not judge itself)."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [str(v) for v in value.values()]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [str(v) for v in value]
    return [str(value)]


def under_each_reference(value: Any, metric: str, prefix: str, measure: Callable[[str], dict]) -> dict:
    """`measure(spec)` for every reference of `value`, combined into one metric result.

    measure returns the metric's result for one reference ({"value", "stderr", ...}). One
    reference: that result unchanged. Several: the primary's result, plus `references` (label →
    that reference's result, without per-sample lists) and `columns` (`<prefix>_<label>`, with
    `_stderr` where there is one) for tables.
    """
    specs = reference_specs(value, metric)
    results = {label: measure(spec) for label, spec in specs.items()}
    if len(results) == 1:
        return next(iter(results.values()))
    columns: dict[str, float] = {}
    for label, result in results.items():
        columns[f"{prefix}_{label}"] = result["value"]
        error = result.get("stderr")
        if error is not None and error == error:  # not NaN
            columns[f"{prefix}_{label}_stderr"] = error
    primary = next(iter(results.values()))
    return {**primary, "primary_reference": next(iter(results)),
            "references": {label: {k: v for k, v in r.items() if k != "per_sample"} for label, r in results.items()},
            "columns": columns}
