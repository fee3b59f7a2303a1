"""Where a training step's time goes: matmuls, attention, vocabulary-wide work, the rest.

A companion to `step_cost.py` (issue 15, benchmark 1), which measures the D-MMD / teacher
ratio; this says why it is what it is at a given shape. Both fits run in one process, each
profiled over the same number of steps (D-MMD: as many generator as auxiliary steps) with
torch.profiler; each aten op's own CPU time goes to one bucket:

- matmul: `mm`, `addmm`, `bmm` (the trunk's linear layers and the output head),
- attention: SDPA kernels,
- [., V]: any other op with an input as wide as the vocabulary (log-softmax and its backward,
  exp, copies, fills, the float64 CDF of the hard draw, products in the loss),
- other: the rest (optimiser, norms, small elementwise work).

The pass count behind the 5/3 ideal holds for matmuls (a backward is two matmuls per forward
one); vocabulary-wide elementwise work does not follow it (a no-gradient forward still pays a
log-softmax, a backward pays less than twice its forward).

    python benchmarks/step_profile.py [--hidden 256 --layers 4 --length 256 --batch 8 --steps 6]
Writes benchmarks/results/step_profile_<time>/ (results.md, results.json, run_info.json).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from run_info import command_line, results_dir, run_info, write_results, write_run_info  # benchmarks/ is on sys.path
from step_cost import VOCAB, add_shape_arguments, build, fit_steps, random_teacher, shape_of

BUCKETS = ("matmul", "attention", "[., V]", "other")


def bucket(event, vocab: int) -> str:
    name = event.name
    if name in ("aten::mm", "aten::addmm", "aten::bmm"):
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention"
    if any(isinstance(shape, list) and vocab in shape for shape in event.input_shapes):
        return "[., V]"
    return "other"


class Profile(L.Callback):
    """Profiles training steps `first` .. `first + count - 1`."""

    def __init__(self, first: int, count: int):
        self.first, self.last = first, first + count - 1
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.first:
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.last:
            self.profiler.__exit__(None, None, None)


def profile(algo, batch: int, length: int, first: int, count: int) -> dict[str, float]:
    """Seconds of own CPU time per bucket, per step, over `count` steps after `first`."""
    callback = Profile(first, count)
    fit_steps(algo, batch, length, first + count, callback)
    seconds = dict.fromkeys(BUCKETS, 0.0)
    for event in callback.profiler.events():
        if event.name.startswith("aten::"):
            seconds[bucket(event, VOCAB + 1)] += event.self_cpu_time_total / 1e6 / count
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=6, help="steps profiled per fit (even: D-MMD's two phases)")
    parser.add_argument("--skip", type=int, default=2, help="first steps of each fit not profiled (even)")
    args = parser.parse_args()
    started = time.time()
    out = results_dir("step_profile")
    shape = shape_of(args)
    per_step = {}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = random_teacher(Path(tmp), shape)
        for name in ("mdlm", "dmmd"):
            algo = build(name, shape, teacher if name == "dmmd" else None)
            per_step[name] = profile(algo, args.batch, args.length, args.skip, args.steps)
            print(name, {k: round(v, 3) for k, v in per_step[name].items()}, flush=True)
    total = {name: sum(values.values()) for name, values in per_step.items()}
    lines = [f"# Own CPU time per training step by kind of op (DiT {args.hidden} wide × {args.layers}, "
             f"V = {VOCAB + 1}, L = {args.length}, B = {args.batch}; {args.steps} steps profiled per fit)", "",
             "| ops | teacher (mdlm) s | D-MMD s (mean of its phases) | D-MMD / teacher |", "|---|---|---|---|"]
    for key in (*BUCKETS, "total"):
        a, b = (total["mdlm"], total["dmmd"]) if key == "total" else (per_step["mdlm"][key], per_step["dmmd"][key])
        lines.append(f"| {key} | {a:.3f} | {b:.3f} | {b / a:.2f} |" if a > 0 else f"| {key} | {a:.3f} | {b:.3f} | |")
    write_results(out, {**vars(args), "vocab": VOCAB + 1, "seconds_per_step": per_step, "total": total}, lines)
    write_run_info(out, run_info(command_line("step_profile.py", args), started))


if __name__ == "__main__":
    main()
