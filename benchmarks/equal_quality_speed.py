"""Sampling speed at equal quality: teacher steps that match a D-MMD student, and the wall clock.

Issue 15, benchmark 2. From a sweep's `results.csv` (default: `baselines_digits_2026-12-05`, the
digits teacher at 4–64 steps and D-MMD students at k = 4, 8, 1000 samples, Fréchet distances in
two feature spaces with bootstrap s.e.), for each student and feature space: the teacher steps n
whose FD equals the student's, interpolated linearly in log2(steps) between the two measured
teacher rows that bracket it, with an s.e. from a parametric bootstrap (the three FDs drawn
from normals with their s.e.); the NFE ratio n / k is the research result. Then the engineering
check: the wall clock of the teacher at round(n) steps over the student's at k, the two
samplers alternating in one process (same batch, seed, machine), which should be ≥ 0.9 × the
NFE ratio (a student step costs what a teacher step costs).

A step is not a fixed cost: the masked sampler runs the network only on the sequences that
reveal a token at that step, and its output head only at the revealed tokens (`sampling.py`).
At many steps per token most steps reveal nothing in most sequences, so a teacher step at n
steps costs less than a student step at k. The benchmark therefore also counts, in an untimed
run with the same seed, the sequences each sampler passes through the network (rows of its
forward calls): the ratio of those is the work ratio, and wall / work says whether one
sequence's forward costs the same in both samplers. Last, each student and the teacher at the same
k steps (alternating, best of the repeats): the direct price of a student step against a
teacher step, per step and per sequence through the network.

    python benchmarks/equal_quality_speed.py [--results DIR/sweep/results.csv --samples 1000 --repeats 3]
Writes benchmarks/results/equal_quality_speed_<time>/ (results.md, results.json, run_info.json).
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import time
from pathlib import Path

import torch

from mdlm_dmmd.pipeline import Pipeline

from run_info import command_line, results_dir, run_info, write_results, write_run_info  # benchmarks/ is on sys.path

SPACES = ("digits_mlp", "digits_cnn")


def matching_steps(curve: list[tuple[int, float]], target: float) -> float | None:
    """Teacher steps where its FD (decreasing in steps, roughly) crosses `target`, linear in
    log2(steps) between the bracketing rows; None outside the measured range."""
    for (n0, f0), (n1, f1) in zip(curve, curve[1:]):
        if min(f0, f1) <= target <= max(f0, f1) and f0 != f1:
            fraction = (f0 - target) / (f0 - f1)
            return 2 ** (math.log2(n0) + fraction * (math.log2(n1) - math.log2(n0)))
    return None


def bootstrap_se(curve, errors, target, target_se, draws: int = 2000) -> float:
    g = torch.Generator().manual_seed(0)
    values = []
    for _ in range(draws):
        noisy = [(n, f + e * float(torch.randn(1, generator=g))) for (n, f), e in zip(curve, errors)]
        hit = matching_steps(noisy, target + target_se * float(torch.randn(1, generator=g)))
        if hit is not None:
            values.append(math.log2(hit))
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    log_sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return log_sd * math.log(2) * 2 ** mean  # delta method back from log2(steps)


def network_rows(pipeline: Pipeline, samples: int, steps: int) -> int:
    """Sequences passed through `pipeline`'s network (summed over its forward calls) while it
    draws `samples` samples in `steps` steps, seed 1 as in the timed runs."""
    rows = []
    hook = pipeline.network.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    try:
        pipeline.generate(samples, steps=steps, generator=torch.Generator().manual_seed(1))
    finally:
        hook.remove()
    return sum(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path,
                        default=Path("benchmarks/results/baselines_digits_2026-12-05/sweep/results.csv"))
    parser.add_argument("--teacher", default="Masked teacher", help="the teacher's `method` in results.csv")
    parser.add_argument("--student", default="D-MMD", help="the students' `method` in results.csv")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started = time.time()
    out = results_dir("equal_quality_speed")
    with open(args.results) as f:
        rows = [r for r in csv.DictReader(f) if r["top_p"] in ("1.0", "")]
    teacher = sorted((r for r in rows if r["method"] == args.teacher), key=lambda r: int(r["steps"]))
    students = sorted((r for r in rows if r["method"] == args.student), key=lambda r: int(r["steps"]))
    if not teacher or not students:
        raise SystemExit(f"{args.results}: no rows for teacher {args.teacher!r} or student {args.student!r}")

    results = []
    pipelines = {"teacher": Pipeline.from_checkpoint(teacher[0]["checkpoint"])}
    for student in students:
        k = int(student["steps"])
        pipelines[k] = Pipeline.from_checkpoint(student["checkpoint"])
        for space in SPACES:
            curve = [(int(r["steps"]), float(r[f"fd_{space}"])) for r in teacher]
            errors = [float(r[f"fd_{space}_stderr"]) for r in teacher]
            target, target_se = float(student[f"fd_{space}"]), float(student[f"fd_{space}_stderr"])
            n = matching_steps(curve, target)
            results.append({"k": k, "space": space, "student_fd": target, "student_fd_se": target_se,
                            "teacher_steps": n, "teacher_steps_se": bootstrap_se(curve, errors, target, target_se)
                            if n is not None else None, "nfe_ratio": None if n is None else n / k})

    def best_of(runs: dict) -> dict:
        """Best wall time of each (pipeline, steps) in `runs`, the order alternating per repeat."""
        best = dict.fromkeys(runs, float("inf"))
        for repeat in range(args.repeats):
            for who in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
                pipeline, steps = runs[who]
                begin = time.perf_counter()
                pipeline.generate(args.samples, steps=steps, generator=torch.Generator().manual_seed(1))
                best[who] = min(best[who], time.perf_counter() - begin)
        return best

    @functools.cache
    def rows_of(who, steps: int) -> int:  # a student at k is counted once, not once per row and again at k
        return network_rows(pipelines[who], args.samples, steps)

    timings = {}
    for k in sorted({r["k"] for r in results}):
        for space_row in (r for r in results if r["k"] == k and r["teacher_steps"] is not None):
            n = round(space_row["teacher_steps"])
            if (k, n) in timings:
                space_row["wall"] = timings[(k, n)]
                continue
            best = best_of({"teacher": (pipelines["teacher"], n), "student": (pipelines[k], k)})
            rows = {"teacher": rows_of("teacher", n), "student": rows_of(k, k)}
            timings[(k, n)] = {"teacher_steps_timed": n, **{f"{w}_s": v for w, v in best.items()},
                               "wall_ratio": best["teacher"] / best["student"], "nfe_ratio_timed": n / k,
                               **{f"{w}_rows": v for w, v in rows.items()}, "work_ratio": rows["teacher"] / rows["student"]}
            space_row["wall"] = timings[(k, n)]
            print(k, space_row["space"], timings[(k, n)], flush=True)

    lines = [f"# Teacher steps at a D-MMD student's quality, and the wall clock ({args.samples} samples, "
             f"best of {args.repeats})", "",
             "| student k | feature space | student FD | teacher steps at that FD (± s.e.) | NFE ratio | "
             "timed: teacher n / student k (s) | wall ratio | wall / NFE ratio (n = round) | "
             "sequences through the network: teacher / student | work ratio | wall / work ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["teacher_steps"] is None:
            lines.append(f"| {r['k']} | {r['space']} | {r['student_fd']:.1f} ± {r['student_fd_se']:.1f} | "
                         "outside the teacher's measured range | | | | | | | |")
            continue
        w = r["wall"]
        lines.append(f"| {r['k']} | {r['space']} | {r['student_fd']:.1f} ± {r['student_fd_se']:.1f} | "
                     f"{r['teacher_steps']:.1f} ± {r['teacher_steps_se']:.1f} | {r['nfe_ratio']:.2f} | "
                     f"{w['teacher_steps_timed']}: {w['teacher_s']:.2f} / {w['student_s']:.2f} | "
                     f"{w['wall_ratio']:.2f} | {w['wall_ratio'] / w['nfe_ratio_timed']:.2f} | "
                     f"{w['teacher_rows']} / {w['student_rows']} | {w['work_ratio']:.2f} | "
                     f"{w['wall_ratio'] / w['work_ratio']:.2f} |")
    same_steps = []
    for k in sorted({r["k"] for r in results}):
        best = best_of({"teacher": (pipelines["teacher"], k), "student": (pipelines[k], k)})
        rows = {"teacher": rows_of("teacher", k), "student": rows_of(k, k)}
        same_steps.append({"k": k, **{f"{w}_s": v for w, v in best.items()}, **{f"{w}_rows": v for w, v in rows.items()}})
        print("same steps", same_steps[-1], flush=True)
    lines += ["", "## A student step against a teacher step, both at k steps", "",
              "| k | teacher s | student s | student / teacher | sequences through the network: teacher / student | "
              "per sequence: student / teacher |", "|---|---|---|---|---|---|"]
    for r in same_steps:
        per_row = (r["student_s"] / r["student_rows"]) / (r["teacher_s"] / r["teacher_rows"])
        lines.append(f"| {r['k']} | {r['teacher_s']:.2f} | {r['student_s']:.2f} | {r['student_s'] / r['teacher_s']:.2f} | "
                     f"{r['teacher_rows']} / {r['student_rows']} | {per_row:.2f} |")
    write_results(out, {**{k: str(v) for k, v in vars(args).items()}, "rows": results, "same_steps": same_steps}, lines)
    write_run_info(out, run_info(command_line("equal_quality_speed.py", args), started))


if __name__ == "__main__":
    main()
