"""Peak memory of one training step at OpenWebText shape: a D-MMD update vs a teacher (mdlm) update.

Issue 15: the `small` DiT (768 wide, 12 layers), V = 50258 (GPT-2 + mask), L = 1024, B = 1, 2, 4,
fp32 on the CPU, random weights (memory does not depend on them) and random tokens. Each case
runs in its own process: build the algo (D-MMD: teacher, generator and auxiliary networks),
then `trainer.fit` for one teacher update or two D-MMD updates (a generator and an auxiliary
phase, each with its own AdamW), and report the process's peak RSS above what it held after the
imports (`ru_maxrss`). CPU RSS is no predictor of GPU memory (CPU kernels, fp32, no caching
allocator); the ratio D-MMD / teacher and the growth with B are what this measures.

    python benchmarks/step_memory.py [--batches 1 2 4]
Writes benchmarks/results/step_memory_<time>/ (results.md, results.json, run_info.json).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_info import command_line, results_dir, run_info, write_results, write_run_info  # benchmarks/ is on sys.path

VOCAB = 50257  # GPT-2; the masked networks have one more (the mask)


def model_overrides(shape: dict) -> list[str]:
    return ["model=small", *(f"model.{key}={value}" for key, value in shape.items()), "model.dropout=0.0",
            "model.attn_backend=sdpa"]


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def current_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def child(algo_name: str, batch: int, teacher: str | None, shape: dict) -> dict:
    """One case, in this process: build, fit 1 (mdlm) or 2 (dmmd: gen + aux) updates, measure."""
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from mdlm_dmmd import cli, registry

    torch.manual_seed(0)
    base = current_gb()
    overrides = [f"algo={algo_name}", *model_overrides(shape), "training.ema=0.0"]
    if teacher:
        overrides.append(f"algo.teacher={teacher}")
    config = OmegaConf.to_container(cli.compose(overrides), resolve=True)
    config["vocab"] = {"size": VOCAB, "bos_id": VOCAB - 1, "eos_id": VOCAB - 1, "modality": "text", "image_shape": None}
    algo = registry.load_algo(algo_name)(config)
    built = current_gb()
    updates = 2 if algo_name == "dmmd" else 1
    data = [{"input_ids": torch.randint(0, VOCAB, (batch, shape["length"]))} for _ in range(updates)]
    trainer = L.Trainer(max_steps=updates, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    started = time.perf_counter()
    trainer.fit(algo, torch.utils.data.DataLoader(data, batch_size=None))
    return {"algo": algo_name, "batch": batch, "updates": updates, "seconds": round(time.perf_counter() - started, 1),
            "after_imports_gb": round(base, 2), "after_build_gb": round(built, 2), "peak_gb": round(peak_gb(), 2),
            "peak_above_imports_gb": round(peak_gb() - base, 2)}


def make_teacher(directory: Path, shape: dict) -> str:
    import torch

    from mdlm_dmmd.checkpoints import save_backbone
    from mdlm_dmmd.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    network = DiT(DiTConfig(vocab_size=VOCAB + 1, **shape, cond_dim=128, dropout=0.0, attn_backend="sdpa"))
    meta = {"process": "masked", "mask_id": VOCAB, "schedule": "loglinear", "schedule_eps": 1e-3,
            "time_conditioning": False}
    return str(save_backbone(directory / "teacher", network, meta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--child", nargs=3, metavar=("ALGO", "BATCH", "TEACHER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = {"length": args.length, "hidden_dim": args.hidden, "n_blocks": args.layers, "n_heads": args.heads}
    if args.child:
        algo, batch, teacher = args.child
        print(json.dumps(child(algo, int(batch), None if teacher == "-" else teacher, shape)))
        return
    started = time.time()
    out = results_dir("step_memory")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_teacher(Path(tmp), shape)
        for batch in args.batches:
            for algo, path in (("mdlm", "-"), ("dmmd", teacher)):
                done = subprocess.run([sys.executable, __file__, "--child", algo, str(batch), path,
                                       "--length", str(args.length), "--hidden", str(args.hidden),
                                       "--layers", str(args.layers), "--heads", str(args.heads)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{algo} B={batch} failed:\n{done.stderr[-3000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
                (out / "results.json").write_text(json.dumps(rows, indent=2))
    teacher_peak = {r["batch"]: r["peak_above_imports_gb"] for r in rows if r["algo"] == "mdlm"}
    lines = [f"# Peak memory of a training step: D-MMD (gen + aux updates) vs teacher (mdlm), DiT {args.hidden} wide × "
             f"{args.layers}, V = {VOCAB + 1}, L = {args.length}, fp32 CPU", "",
             "| algo | B | after build (GB) | peak (GB) | peak above imports (GB) | D-MMD / teacher | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['peak_above_imports_gb'] / teacher_peak[r['batch']]:.2f}" if r["algo"] == "dmmd" else ""
        lines.append(f"| {r['algo']} | {r['batch']} | {r['after_build_gb']} | {r['peak_gb']} | "
                     f"{r['peak_above_imports_gb']} | {ratio} | {r['seconds']} |")
    write_results(out, rows, lines)
    write_run_info(out, run_info(command_line("step_memory.py", args), started))


if __name__ == "__main__":
    main()
