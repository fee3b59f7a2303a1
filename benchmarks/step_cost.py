"""Distillation step cost: a D-MMD update vs a teacher (mdlm) update, same model, batch and length.

Issue 15, benchmark 1. By pass counting (a backward ≈ 2 forwards) a D-MMD phase is 5 units
(generator phase: generator forward + backward, teacher and auxiliary forwards; auxiliary
phase: generator and teacher forwards, auxiliary forward + backward) against the teacher's 3,
so the ideal ratio is 5/3 ≈ 1.67; the target is ≤ 1.8. Both run through `trainer.fit` as users
run them (Lightning, AdamW, the D-MMD alternation and its guards); a callback times every
training step, the first `--skip` of each fit are dropped, and a D-MMD update is the mean of its
generator and auxiliary steps. The two fits alternate `--repeats` times in one process; the
median step of each is compared.

Random weights and tokens, fp32 on the CPU, masked teacher, the DiT shape from the flags
(default 256 wide × 4 layers, V = 50258, L = 256, B = 8: minutes on 2 cores). On a GPU:
`--device cuda --precision bf16-mixed --attn auto` (flash when installed), the clock read after
a CUDA synchronise.

    python benchmarks/step_cost.py [--repeats 2 --steps 12]
Writes benchmarks/results/step_cost_<time>/ (results.md, results.json, run_info.json).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from mdlm_dmmd import cli, registry
from mdlm_dmmd.checkpoints import save_backbone
from mdlm_dmmd.models.dit import DiT, DiTConfig

from run_info import command_line, results_dir, run_info, write_results, write_run_info  # benchmarks/ is on sys.path

VOCAB = 50257  # GPT-2; the masked networks add the mask


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(L.Callback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        synchronize()
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        synchronize()
        self.seconds.append(time.perf_counter() - self._started)


def build(algo_name: str, shape: dict, teacher: str | None, attn: str = "sdpa"):
    overrides = [f"algo={algo_name}", "model=small", *(f"model.{k}={v}" for k, v in shape.items()),
                 "model.dropout=0.0", f"model.attn_backend={attn}", "training.ema=0.0"]
    if teacher:
        overrides.append(f"algo.teacher={teacher}")
    config = OmegaConf.to_container(cli.compose(overrides), resolve=True)
    config["vocab"] = {"size": VOCAB, "bos_id": VOCAB - 1, "eos_id": VOCAB - 1, "modality": "text", "image_shape": None}
    return registry.load_algo(algo_name)(config)


def fit_steps(algo, batch: int, length: int, steps: int, callback: L.Callback, device: str = "cpu",
              precision: str = "32-true") -> None:
    """`steps` training steps of `algo` on random tokens [batch, length], watched by `callback`."""
    data = [{"input_ids": torch.randint(0, VOCAB, (batch, length))} for _ in range(steps)]
    trainer = L.Trainer(max_steps=steps, accelerator="gpu" if device == "cuda" else "cpu", precision=precision,
                        logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[callback])
    trainer.fit(algo, torch.utils.data.DataLoader(data, batch_size=None))


def step_seconds(algo, batch: int, length: int, steps: int, skip: int, device: str, precision: str) -> list[float]:
    timer = StepTimer()
    fit_steps(algo, batch, length, steps, timer, device, precision)
    return timer.seconds[skip:]


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The DiT shape and batch flags (default 256 wide × 4 layers, L = 256, B = 8)."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)


def shape_of(args) -> dict:
    return {"length": args.length, "hidden_dim": args.hidden, "n_blocks": args.layers, "n_heads": args.heads}


def random_teacher(folder: Path, shape: dict, attn: str = "sdpa") -> str:
    """A masked teacher of `shape` with random weights (a non-trivial head), saved in `folder`;
    the D-MMD networks copy its config, `attn` (the attention backend) included."""
    torch.manual_seed(0)
    network = DiT(DiTConfig(vocab_size=VOCAB + 1, **shape, cond_dim=128, dropout=0.0, attn_backend=attn))
    torch.nn.init.normal_(network.output_layer.linear.weight, std=0.02)
    return str(save_backbone(folder / "teacher", network, {
        "process": "masked", "mask_id": VOCAB, "schedule": "loglinear", "schedule_eps": 1e-3,
        "time_conditioning": False}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=12, help="training steps per fit (D-MMD: gen and aux alternate)")
    parser.add_argument("--skip", type=int, default=2, help="first steps of each fit not timed (even)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--attn", default="sdpa", help="model.attn_backend (auto, sdpa, flex, flash)")
    args = parser.parse_args()
    started = time.time()
    out = results_dir("step_cost")
    shape = shape_of(args)
    times: dict[str, list[float]] = {"mdlm": [], "dmmd_even": [], "dmmd_odd": []}  # D-MMD: the two phases
    with tempfile.TemporaryDirectory() as tmp:
        teacher = random_teacher(Path(tmp), shape, args.attn)
        for repeat in range(args.repeats):
            for name in (("mdlm", "dmmd") if repeat % 2 == 0 else ("dmmd", "mdlm")):
                algo = build(name, shape, teacher if name == "dmmd" else None, args.attn)
                seconds = step_seconds(algo, args.batch, args.length, args.steps, args.skip, args.device, args.precision)
                if name == "mdlm":
                    times["mdlm"] += seconds
                else:  # phases alternate step by step; `skip` is even, so both lists keep one phase
                    times["dmmd_even"] += seconds[0::2]
                    times["dmmd_odd"] += seconds[1::2]
                print(f"repeat {repeat}: {name} {[round(x, 3) for x in seconds]}", flush=True)
            write_table(out, args, times, started)  # after every repeat: a run cut short keeps its table


def write_table(out: Path, args, times: dict[str, list[float]], started: float) -> None:
    median = {name: statistics.median(values) for name, values in times.items()}
    median["dmmd"] = (median["dmmd_even"] + median["dmmd_odd"]) / 2
    result = {**vars(args), "vocab": VOCAB + 1, "median_step_s": median, "steps_timed": {k: len(v) for k, v in times.items()},
              "ratio": median["dmmd"] / median["mdlm"], "ideal": 5 / 3, "target": 1.8}
    lines = [f"# D-MMD update vs teacher update (DiT {args.hidden} wide × {args.layers}, V = {VOCAB + 1}, "
             f"L = {args.length}, B = {args.batch}; {args.device} {args.precision}, attention {args.attn}, "
             f"{len(times['mdlm'])} teacher and "
             f"{len(times['dmmd_even']) + len(times['dmmd_odd'])} D-MMD steps timed)",
             "", "| update | median s | ratio | ideal (pass count) | target |", "|---|---|---|---|---|",
             f"| teacher (mdlm) | {median['mdlm']:.3f} | 1.00 | 1 | |",
             f"| D-MMD (mean of the two phases' medians: {median['dmmd_even']:.3f}, {median['dmmd_odd']:.3f}) | "
             f"{median['dmmd']:.3f} | **{result['ratio']:.2f}** | 1.67 | ≤ 1.8 |"]
    write_results(out, result, lines)
    write_run_info(out, run_info(command_line("step_cost.py", args), started))


if __name__ == "__main__":
    main()
