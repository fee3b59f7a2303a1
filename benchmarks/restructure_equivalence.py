"""Same seed, same numbers: small runs of every mode captured before and after a restructuring.

    python benchmarks/restructure_equivalence.py capture OUT_DIR      # runs the modes below
    python benchmarks/restructure_equivalence.py compare BEFORE AFTER  # tensors, samples, metrics

Captured (all `debug=cpu data=digits`, one fresh process per run): `mode=train` of mdlm, udlm,
ar, dmmd (masked teacher, noise input) and dmmd (uniform teacher, posterior space); `mode=sample`
and `mode=eval` (entropy, frechet) of each; a tiny `mode=study` (teacher + one student, cache
off); a `mode=sweep` over teacher, student and AR baseline. `compare` checks, per run,
state_dict, EMA and optimiser tensors bit for bit, the checkpoint metadata field by field (its
format may change by design: differences are listed, not failed), samples.pt bit for bit and
metrics.json / results.csv exactly except for wall-clock columns. Run `capture` from each
checkout (e.g. a `git worktree` of the older commit on PYTHONPATH) with the same MDLM_DMMD_CACHE.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

COMMON = ["debug=cpu", "data=digits", "model.length=64", "logger=none"]
TIMING = {"train minutes", "train_minutes", "sample_seconds", "checkpoint"}


def cli(out: Path, name: str, *overrides: str) -> None:
    args = [sys.executable, "-m", "mdlm_dmmd", *COMMON, f"run_dir={out / name}", *overrides]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    print(f"captured {name}")


def capture(out: Path) -> None:
    out = out.resolve()
    final = lambda name: out / name / "checkpoints" / "final.ckpt"  # noqa: E731
    cli(out, "train_mdlm", "algo=mdlm")
    cli(out, "train_udlm", "algo=udlm")
    cli(out, "train_ar", "algo=ar", "sampling.num_samples=0")
    cli(out, "train_dmmd_masked", "algo=dmmd", f"algo.teacher={final('train_mdlm')}", "algo.sampling_steps=2")
    cli(out, "train_dmmd_uniform", "algo=dmmd", f"algo.teacher={final('train_udlm')}", "algo.sampling_steps=2")
    for run in ("mdlm", "udlm", "dmmd_masked", "dmmd_uniform"):
        cli(out, f"sample_{run}", "mode=sample", f"checkpoint={final('train_' + run)}", "sampling.steps=null")
        cli(out, f"eval_{run}", "mode=eval", f"checkpoint={final('train_' + run)}", "eval.metrics=[entropy,frechet]",
            "sampling.num_samples=8")
    cli(out, "eval_ar", "mode=eval", f"checkpoint={final('train_ar')}", "eval.metrics=[entropy]")
    cli(out, "study", "mode=study", "algo=mdlm", "study.teacher_steps=[2,4]", "study.student_steps=[2]",
        "study.student_max_steps=4", "study.num_samples=8", "study.reuse_teacher=false", "study.noise_input=[true]",
        "eval.metrics=[entropy,frechet]")
    methods = (f"[{{name: teacher, checkpoint: {final('train_mdlm')}, steps: [2, 4], top_p: [1.0, 0.9]}},"
               f" {{name: student, checkpoint: {final('train_dmmd_masked')}, steps: null}}]")
    cli(out, "sweep", "mode=sweep", f"sweep.methods={methods}", f"sweep.ar_baseline={final('train_ar')}",
        "sweep.num_samples=8", "eval.metrics=[entropy,frechet]")


def _tensors(tree, prefix=""):
    """Flatten nested dicts/lists of tensors and numbers to {path: value}."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    flat = {}
    for key, value in items:
        flat.update(_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def compare_checkpoint(a: Path, b: Path) -> list[str]:
    load = lambda p: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731  (our own files)
    ca, cb = load(a), load(b)
    problems = []
    for key in ("state_dict", "ema", "optimizer_states", "lr_schedulers", "rng", "loops", "distillation"):
        fa, fb = _tensors(ca.get(key, {})), _tensors(cb.get(key, {}))
        if fa.keys() != fb.keys():
            problems.append(f"{key}: keys differ ({sorted(set(fa) ^ set(fb))[:4]})")
        diff = [k for k in fa.keys() & fb.keys() if not _same(fa[k], fb[k])]
        if diff:
            problems.append(f"{key}: {len(diff)} entries differ, e.g. {sorted(diff)[:3]}")
    meta_a, meta_b = _tensors(ca.get("mdlm_dmmd", {})), _tensors(cb.get("mdlm_dmmd", {}))
    notes = [f"meta {k}: {meta_a.get(k, '<absent>')!r} -> {meta_b.get(k, '<absent>')!r}"
             for k in sorted(meta_a.keys() | meta_b.keys()) if not _same(meta_a.get(k), meta_b.get(k))]
    return problems, notes


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def compare(before: Path, after: Path) -> int:
    failures = 0
    for run in sorted(p.name for p in before.iterdir() if p.is_dir()):
        a, b = before / run, after / run
        problems, notes = [], []
        for ckpt in sorted((a / "checkpoints").glob("*.ckpt")) if (a / "checkpoints").is_dir() else []:
            p, n = compare_checkpoint(ckpt, b / "checkpoints" / ckpt.name)
            problems += [f"{ckpt.name}: {x}" for x in p]
            notes += [f"{ckpt.name}: {x}" for x in n]
        for folder in [a, *sorted(d for d in a.iterdir() if d.is_dir())]:
            rel = folder.relative_to(a)
            if (folder / "samples.pt").is_file():
                if not torch.equal(torch.load(folder / "samples.pt"), torch.load(b / rel / "samples.pt")):
                    problems.append(f"{rel}/samples.pt differs")
            if (folder / "metrics.json").is_file():
                ma, mb = (json.loads((d / rel / "metrics.json").read_text()) for d in (a, b))
                ma, mb = ({k: v for k, v in m.items() if k not in TIMING} for m in (ma, mb))
                if ma != mb:
                    problems.append(f"{rel}/metrics.json differs: {ma} vs {mb}")
            if (folder / "results.csv").is_file() and _rows(folder / "results.csv") != _rows(b / rel / "results.csv"):
                problems.append(f"{rel}/results.csv differs")
        failures += bool(problems)
        print(f"{'DIFFERS' if problems else 'same   '} {run}")
        for line in problems + notes:
            print(f"    {line}")
    return failures


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "capture":
        os.environ.setdefault("PYTHONHASHSEED", "0")
        capture(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(1 if compare(Path(sys.argv[2]), Path(sys.argv[3])) else 0)
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
