"""What every benchmark writes next to its results (command, date, machine, versions, wall time),
the paired timing of two variants, and the train-or-reuse step of the benchmarks that train models."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch


def paired_ratio(first: tuple[str, Callable[[], None]], second: tuple[str, Callable[[], None]], repeats: int,
                 synchronize: Callable[[], None] = lambda: None) -> dict:
    """Time two variants in `repeats` back-to-back pairs, the order alternating, after one warm-up
    call each; `synchronize` runs before each clock reading (a GPU's). The VM's speed drifts by
    10-20% between minutes, which a ratio of two best times does not cancel; the median of the
    pairs' ratios does. {"<name>_s": median seconds of each, "ratio": median of second / first,
    "ratio_quartiles": [q1, q3]}"""
    calls = dict((first, second))
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call()
    for repeat in range(repeats):
        for name in (list(calls) if repeat % 2 == 0 else list(calls)[::-1]):
            synchronize()
            begun = time.perf_counter()
            calls[name]()
            synchronize()
            seconds[name].append(time.perf_counter() - begun)
    ratios = [b / a for a, b in zip(seconds[first[0]], seconds[second[0]])]
    return {**{f"{name}_s": round(statistics.median(times), 4) for name, times in seconds.items()},
            "ratio": round(statistics.median(ratios), 3),
            "ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)[::2]]}


def ratio_cell(row: dict) -> str:
    """A `paired_ratio` result as a Markdown table cell: the median ratio in bold, the quartiles after."""
    low, high = row["ratio_quartiles"]
    return f"**{row['ratio']:.3f}** ({low:.3f}–{high:.3f})"


def run_info(command: str, started: float, **extra) -> dict:
    """A `run_info.json` record; `started` is the `time.time()` at the benchmark's start."""
    return {
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "lightning", "mdlm-dmmd")},
        "wall_minutes": round((time.time() - started) / 60, 1),
        **extra,
    }


def results_dir(name: str) -> Path:
    """benchmarks/results/<name>_<date>_<time>/, where a run's files go (created when written)."""
    return Path("benchmarks/results") / f"{name}_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"


def command_line(script: str, args: argparse.Namespace) -> str:
    """`python benchmarks/<script>` with the parsed flags spelled out again: lists joined by
    spaces, a true store_true flag bare, false and None values left out."""
    words = ["python", f"benchmarks/{script}"]
    for key, value in vars(args).items():
        if value is None or value is False:
            continue
        words.append(f"--{key.replace('_', '-')}")
        if value is not True:
            words += [shlex.quote(str(v)) for v in (value if isinstance(value, list) else [value])]
    return " ".join(words)


def write_results(folder: Path, data, lines: list[str]) -> None:
    """results.json (`data`) and results.md (the table `lines`, also printed) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(data, indent=2))
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_run_info(folder: Path, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


def train_or_reuse(out: Path, name: str, overrides: list[str]) -> Path:
    """`mdlm-dmmd OVERRIDES run_dir=out/name`, unless that folder already holds a finished run
    (its checkpoints/final.ckpt), which is reused; a run stopped before its end resumes from its
    checkpoints/last.ckpt: an interrupted benchmark goes on where it stopped."""
    from mdlm_dmmd import cli

    final = out / name / "checkpoints" / "final.ckpt"
    last = out / name / "checkpoints" / "last.ckpt"
    resume = [f"checkpoint={last}"] if last.is_file() else []
    if not final.is_file() and cli.main([*overrides, *resume, f"run_dir={out / name}"]) != 0:
        raise SystemExit(f"training {name} failed")
    return final
