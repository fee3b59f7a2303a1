"""The evaluation pictures: a metric against sampling steps, one metric against another, and
panels of sample grids (image data) side by side.

Both take result rows as plain dicts (`{"method": ..., "steps": ..., "<metric>": value,
"<metric>_stderr": error, "source": "measured" | "data" | "quoted"}`), the shape `results.csv`
holds, and write a PNG. Conventions shared by every picture:

- one colour per method (the `group` key), in the order the methods first appear;
- rows quoted from the literature (`source == "quoted"`) use an `x` marker and a dotted line, so a
  copied number is never mistaken for a measured one;
- rows without a step count (the "Data" reference row) are a horizontal dashed line in the
  metric-vs-steps plot (they have no NFE) and a star in the trade-off scatter.

Used by `mode=sweep` and `mode=study` (mdlm_dmmd/modes/).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from mdlm_dmmd.eval.tables import as_number

if TYPE_CHECKING:
    import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _groups(rows: Iterable[dict], group: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(str(row[group]), []).append(row)
    return out


def _finish(plt, fig, ax, path: Path, x_label: str, y_label: str, title: str | None, legend_size: int) -> None:
    """Labels, optional title, legend; write the PNG and free the figure."""
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metric_vs_steps(rows: list[dict], metric: str, path: Path, *, group: str = "method",
                    errorbars: bool = False, title: str | None = None) -> None:
    """`metric` against sampling steps (NFE, log2 axis), one line per `group` value.

    Rows without steps become horizontal dashed lines; with `errorbars`, `<metric>_stderr` is
    drawn as ± one standard error.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, members in _groups(rows, group).items():
        quoted = any(r.get("source") == "quoted" for r in members)
        stepped = sorted((int(r["steps"]), as_number(r.get(metric)), as_number(r.get(f"{metric}_stderr")))
                         for r in members if as_number(r.get("steps")) is not None and as_number(r.get(metric)) is not None)
        flat = [as_number(r.get(metric)) for r in members if as_number(r.get("steps")) is None and as_number(r.get(metric)) is not None]
        style = {"marker": "x", "linestyle": ":"} if quoted else {"marker": "o"}
        if stepped:
            x, y, err = zip(*stepped)
            if errorbars and any(e is not None for e in err):
                ax.errorbar(x, y, yerr=[e or 0.0 for e in err], label=label, capsize=2, **style)
            else:
                ax.plot(x, y, label=label, **style)
        for value in flat:
            ax.axhline(value, linestyle="--", linewidth=1, color="black", label=label)
    ax.set_xscale("log", base=2)
    _finish(plt, fig, ax, path, "sampling steps (NFE)", metric, title, legend_size=8)


def tradeoff(rows: list[dict], x_metric: str, y_metric: str, path: Path, *, group: str = "method",
             title: str | None = None) -> None:
    """Scatter of `y_metric` against `x_metric`, one point per row, one colour per `group`
    value, each point annotated with its steps (the Pareto view of a sweep)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, members in _groups(rows, group).items():
        points = [(as_number(r.get(x_metric)), as_number(r.get(y_metric)), r.get("steps"), r.get("source"))
                  for r in members]
        points = [p for p in points if p[0] is not None and p[1] is not None]
        if not points:
            continue
        source = points[0][3]
        marker = "x" if source == "quoted" else "*" if source == "data" else "o"
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.scatter(xs, ys, marker=marker, s=60 if marker == "*" else 30, label=label)
        for x, y, steps, _ in points:
            if as_number(steps) is not None:
                ax.annotate(str(int(steps)), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    _finish(plt, fig, ax, path, x_metric, y_metric, title, legend_size=7)


def sample_panels(grids: dict[str, "np.ndarray"], path: Path) -> None:
    """Pictures of samples (RGB arrays, e.g. `DataBundle.sample_grid`), one panel per label."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 3.0), squeeze=False)
    for ax, (label, picture) in zip(axes[0], grids.items()):
        ax.imshow(picture)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
