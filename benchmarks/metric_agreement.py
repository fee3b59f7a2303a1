"""Does a comparison hold in every metric? Read a study's or sweep's results.csv and, for one
candidate row (e.g. a D-MMD student) against a baseline method at several step counts (its
teacher), say per metric column — every feature space's FD and KID, GM under every reference —
where the candidate stands, in standard errors.

For each metric (lower is better) and each baseline row: the difference candidate − baseline and
z = difference / √(s.e.² + s.e.²). Verdicts: "beats" (z < −2), "matches" (|z| ≤ 2), "worse"
(z > 2). The summary line per metric names the most baseline steps the candidate matches or
beats, which is the reading "the 8-step student reaches the N-step teacher" in that metric.

    python benchmarks/metric_agreement.py RESULTS_CSV --candidate "D-MMD (noise input)" \\
        [--candidate-steps 8] [--baseline teacher] [--metrics fd_ kid_ gm_] [--out reading.md]
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path


def number(value: str | None) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def reading(rows: list[dict], candidate: str, candidate_steps: int | None, baseline: str,
            prefixes: tuple[str, ...]) -> tuple[list[str], dict]:
    chosen = [r for r in rows if r["method"] == candidate
              and (candidate_steps is None or number(r.get("steps")) == candidate_steps)]
    if len(chosen) != 1:
        raise SystemExit(f"expected one row of method {candidate!r} (steps {candidate_steps}), found {len(chosen)}")
    cand = chosen[0]
    base = sorted((r for r in rows if r["method"] == baseline), key=lambda r: number(r["steps"]) or 0)
    metrics = [c for c in cand if c.startswith(prefixes) and not c.endswith("_stderr") and number(cand[c]) is not None]
    lines = [f"Candidate: {candidate} at {cand.get('steps')} steps; baseline: {baseline} at "
             f"{', '.join(str(int(number(r['steps']))) for r in base)} steps. z = difference / combined s.e.; "
             "beats: z < −2, matches: |z| ≤ 2, worse: z > 2 (lower is better).", ""]
    header = "| metric | " + " | ".join(f"{baseline} {int(number(r['steps']))}" for r in base) + " | reaches |"
    lines += [header, "|---|" + "---|" * (len(base) + 1)]
    summary = {}
    for metric in metrics:
        value, error = number(cand[metric]), number(cand.get(f"{metric}_stderr")) or 0.0
        cells, reached = [], None
        for r in base:
            other, other_error = number(r.get(metric)), number(r.get(f"{metric}_stderr")) or 0.0
            if other is None:
                cells.append("")
                continue
            spread = math.hypot(error, other_error)
            z = (value - other) / spread if spread > 0 else math.copysign(math.inf, value - other)
            verdict = "beats" if z < -2 else "matches" if z <= 2 else "worse"
            if verdict != "worse":
                reached = int(number(r["steps"]))
            cells.append(f"{value:.4g} vs {other:.4g}: z = {z:+.1f} ({verdict})")
        summary[metric] = reached
        lines.append(f"| {metric} | " + " | ".join(cells) + f" | {reached if reached is not None else 'none'} |")
    lines.append("")
    return lines, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--candidate", required=True)
    parser.add_argument("--candidate-steps", type=int, default=None)
    parser.add_argument("--baseline", default="teacher")
    parser.add_argument("--metrics", nargs="+", default=["fd_", "kid_", "gm_"], help="column prefixes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with open(args.results, newline="") as f:
        rows = list(csv.DictReader(f))
    lines, _ = reading(rows, args.candidate, args.candidate_steps, args.baseline, tuple(args.metrics))
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
