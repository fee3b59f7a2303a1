"""Sample quality along training: score every `stepN.ckpt` of one or more runs.

A D-MMD student's final number says little about whether it was still improving; this scores
the intermediate checkpoints (EMA weights, each at its own k) with the digits study's metrics
(`eval.metrics`, every column each reports) and seed, and writes `trajectory.csv`,
`trajectory.md` and `trajectory.png` (the first metric vs updates).

    python benchmarks/checkpoint_trajectory.py OUT_DIR RUN_DIR [RUN_DIR ...] [key=value ...]

Each RUN_DIR is a training run (has `checkpoints/`) or a folder of them (a study's run_dir; its
teacher, if trained there, is scored too, at `sampling.steps`, 128 when unset).
Overrides compose on `experiment=dmmd_digits` (e.g. `sampling.num_samples=500`).
"""

from __future__ import annotations

import csv
import re
import sys
import time
from pathlib import Path

from mdlm_dmmd import cli
from mdlm_dmmd.eval.scoring import compute_metrics, default_device, flatten, generate, sampling_steps
from mdlm_dmmd.pipeline import Pipeline

from run_info import run_info, write_run_info  # benchmarks/ is on sys.path when run as a script


def checkpoints(folder: Path) -> list[tuple[str, int, Path]]:
    """(run name, updates, path) of every stepN.ckpt under `folder`, by run then updates."""
    found = []
    for path in sorted(folder.glob("**/checkpoints/step*.ckpt")):
        match = re.fullmatch(r"step(\d+)\.ckpt", path.name)
        if match:
            found.append((path.parent.parent.name, int(match.group(1)), path))
    return sorted(found, key=lambda item: (item[0], item[1]))


def main(argv: list[str]) -> int:
    started = time.time()
    folders = [Path(a) for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if len(folders) < 2:
        raise SystemExit(__doc__)
    out, runs = folders[0], folders[1:]
    score_runs(out, runs, overrides)
    write_run_info(out, run_info(" ".join(["python", "benchmarks/checkpoint_trajectory.py", *argv]), started))
    return 0


def score_runs(out: Path, runs: list[Path], overrides: list[str], exclude: tuple[str, ...] = ()) -> list[dict]:
    """Score every checkpoint of `runs` (runs named in `exclude`, e.g. "teacher", left out),
    writing the trajectory files after every row; returns the rows."""
    cfg = cli.compose(["experiment=dmmd_digits", "sampling.num_samples=${study.num_samples}", *overrides])
    rows = []
    for folder in runs:
        for name, updates, path in checkpoints(folder):
            if name in exclude:
                continue
            pipeline = Pipeline.from_checkpoint(path, device=default_device(cfg))
            steps = sampling_steps(cfg, pipeline.meta)
            samples = generate(pipeline, cfg, steps, progress=False)
            metrics = compute_metrics(cfg, samples)
            # every column the metrics report (e.g. frechet's fd_/kid_<space>), as study and sweep tables
            row = {"run": f"{folder.name}/{name}", "updates": updates, "steps": steps, **flatten(metrics)}
            print(row, flush=True)
            rows.append(row)
            write(out, rows)  # after every row: a stopped run keeps what it scored
    return rows


def write(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "trajectory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row.get(c, ''):.4g}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                                       for c in columns) + " |")
    (out / "trajectory.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "frechet" if any("frechet" in row for row in rows) else columns[3]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(row["run"] for row in rows):
        points = [(row["updates"], row[metric]) for row in rows if row["run"] == name]
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("optimiser updates (generator + auxiliary)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "trajectory.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
