"""A sweep's results.csv as the paper's Table 5 (method × steps), and the comparisons it asks for.

Rows: every (method, sampling top-p, distillation top-p, steps), with each metric column ± its
standard error. Comparisons, each as a difference and z = difference / √(se₁² + se₂²), under
every metric column given (e.g. GM under both reference LMs, FD in both feature spaces):
- each method against the teacher at the same steps and sampling top-p (and, for a student
  distilled at a top-p, against the teacher at that top-p);
- D-MMD at its largest k against the teacher at its most steps (the paper's claim: at or below);
- SDTT round by round (the paper's claim: it degrades as the rounds go on);
- D-MMD against each baseline at the same number of steps.

    python benchmarks/table5.py SWEEP/results.csv --columns gm_reference_ar_seed2 gm_reference_ar_seed3 \
        gen_ppl_reference_ar_seed2 entropy > table5.md
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from metric_agreement import number as parse  # benchmarks/ is on sys.path as a script


def read(path: Path) -> list[dict]:
    with open(path) as f:
        return [row for row in csv.DictReader(f) if row["method"] != "Data" and row["steps"]]


def number(row: dict, column: str) -> tuple[float, float]:
    """(value, s.e.) of a metric column; NaN where blank (`metric_agreement.number` parses)."""
    value, stderr = parse(row.get(column)), parse(row.get(f"{column}_stderr"))
    return (math.nan if value is None else value), (math.nan if stderr is None else stderr)


def cell(row: dict, column: str) -> str:
    value, stderr = number(row, column)
    if math.isnan(value):
        return ""
    digits = 3 if abs(value) < 100 else 0
    return f"{value:.{digits}f}" + ("" if math.isnan(stderr) else f" ± {stderr:.{digits}f}")


def key(row: dict) -> tuple:
    return row["method"], row["top_p"], row.get("distill_top_p", ""), int(row["steps"])


def describe(row: dict) -> str:
    p = f"p = {float(row['top_p']):.2f}" if row["top_p"] else ""
    distilled = f", distilled at p = {float(row['distill_top_p']):.2f}" if row.get("distill_top_p") else ""
    return f"{row['method']} ({p}{distilled})" if p or distilled else row["method"]


def z(a: dict, b: dict, column: str) -> str:
    (va, sa), (vb, sb) = number(a, column), number(b, column)
    if math.isnan(va) or math.isnan(vb):
        return ""
    spread = math.sqrt((0 if math.isnan(sa) else sa) ** 2 + (0 if math.isnan(sb) else sb) ** 2)
    return f"{va - vb:+.2f} (z = {(va - vb) / spread:+.1f})" if spread > 0 else f"{va - vb:+.2f}"


def table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| method | steps | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in sorted(rows, key=lambda r: (r["method"] != "Masked teacher", key(r))):
        lines.append(f"| {describe(row)} | {row['steps']} | " + " | ".join(cell(row, c) for c in columns) + " |")
    return lines


def comparisons(rows: list[dict], columns: list[str]) -> list[str]:
    teacher = {(r["top_p"], int(r["steps"])): r for r in rows if r["method"] == "Masked teacher"}
    lines = ["| comparison | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]

    def add(label: str, a: dict, b: dict) -> None:
        lines.append(f"| {label} | " + " | ".join(z(a, b, c) for c in columns) + " |")

    for row in sorted((r for r in rows if r["method"] != "Masked teacher"), key=key):
        same = teacher.get((row["top_p"], int(row["steps"])))
        if same is not None:
            add(f"{describe(row)}, {row['steps']} steps − teacher (same sampling p, same steps)", row, same)
        distilled = teacher.get((row.get("distill_top_p", ""), int(row["steps"])))
        if distilled is not None and row.get("distill_top_p") != row["top_p"]:  # the distribution it was distilled to
            add(f"{describe(row)}, {row['steps']} steps − teacher (its distillation p, same steps)", row, distilled)
    dmmd = [r for r in rows if r["method"] == "D-MMD"]
    if dmmd and teacher:
        best = max(dmmd, key=lambda r: (int(r["steps"]), r.get("distill_top_p", "") != "1.0"))
        for p in sorted({p for p, _ in teacher}):
            most = max(s for q, s in teacher if q == p)
            add(f"{describe(best)}, {best['steps']} steps − teacher at {most} steps (p = {float(p):.2f})" if p else
                f"{describe(best)}, {best['steps']} steps − teacher at {most} steps", best, teacher[(p, most)])
    for p in sorted({r["top_p"] for r in rows if r["method"] == "SDTT"}):
        rounds = sorted((r for r in rows if r["method"] == "SDTT" and r["top_p"] == p), key=lambda r: -int(r["steps"]))
        for earlier, later in zip(rounds, rounds[1:]):
            add(f"{describe(later)}: round with {later['steps']} steps − the round before ({earlier['steps']} steps)",
                later, earlier)
    for row in sorted(dmmd, key=key):  # D-MMD against each baseline at the same number of steps
        for other in sorted((r for r in rows if r["method"] not in ("D-MMD", "Masked teacher")
                             and r["steps"] == row["steps"]), key=key):
            add(f"{describe(row)} − {describe(other)}, {row['steps']} steps", row, other)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--columns", nargs="+", required=True, help="metric columns (their _stderr columns are used)")
    args = parser.parse_args()
    rows = read(args.results)
    print("\n".join(["## Table 5 shape: method × steps", "", *table(rows, args.columns), "",
                     "## Differences (row − reference, z = difference / combined s.e.)", "",
                     *comparisons(rows, args.columns), ""]))


if __name__ == "__main__":
    main()
