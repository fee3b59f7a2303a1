"""The evaluation pictures: a metric against sampling steps, and one metric against another.

Both take result rows as plain dicts (`{"method": ..., "steps": ..., "<metric>": value,
"<metric>_stderr": error, "source": "measured" | "data" | "quoted"}`), the shape `results.csv`
holds, and write a PNG. Conventions shared by every picture:

- one colour per method (the `group` key), in the order the methods first appear;
- rows quoted from the literature (`source == "quoted"`) use an `x` marker and a dotted line, so a
  copied number is never mistaken for a measured one;
- rows without a step count (the "Data" reference row) are a horizontal dashed line in the
  metric-vs-steps plot (they have no NFE) and a star in the trade-off scatter.

Used by `mode=sweep` (eval/sweep.py) and `mode=study` (eval/study.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _number(value) -> float | None:
    """A finite float, or None for blanks, None and NaN (missing cells of a table)."""
    if value is None or value == "":
        return None
    value = float(value)
    return value if value == value else None


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
        stepped = sorted((int(r["steps"]), _number(r.get(metric)), _number(r.get(f"{metric}_stderr")))
                         for r in members if _number(r.get("steps")) is not None and _number(r.get(metric)) is not None)
        flat = [_number(r.get(metric)) for r in members if _number(r.get("steps")) is None and _number(r.get(metric)) is not None]
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
        points = [(_number(r.get(x_metric)), _number(r.get(y_metric)), r.get("steps"), r.get("source"))
                  for r in members]
        points = [p for p in points if p[0] is not None and p[1] is not None]
        if not points:
            continue
        source = points[0][3]
        marker = "x" if source == "quoted" else "*" if source == "data" else "o"
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.scatter(xs, ys, marker=marker, s=60 if marker == "*" else 30, label=label)
        for x, y, steps, _ in points:
            if _number(steps) is not None:
                ax.annotate(str(int(steps)), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    _finish(plt, fig, ax, path, x_metric, y_metric, title, legend_size=7)
