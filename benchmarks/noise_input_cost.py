"""What the generator's noise input costs: a DiT forward with it vs the same DiT without it.

Issue 15 §4.2 asks that a student step cost what a teacher step costs. A D-MMD student is the
teacher's network plus a noise input (paper §6.5): per step it draws the noise (white per token
for text, a pyramid over the image for image tokens) and adds its projection to the embeddings.
This times both forwards side by side (same weights otherwise) at three shapes, in `--repeats`
back-to-back pairs (the order alternating), and reports the median of the pairs' ratios: the VM's
speed drifts by 10-20% between minutes, which a ratio of two best times does not cancel.

- `digits`: the quickstart's 96-wide, 3-layer DiT on 64 tokens with a 4-level pyramid, batch 500
  (the digits equal-quality benchmark's student);
- `text`: the `small` DiT (768 wide, 12 layers, V = 50258) on 1024 tokens, white noise, batch 2;
- `cifar`: the `small` DiT on 32·32·3 = 3072 pixel tokens (V = 257), a 6-level pyramid, batch 1.

Noise width 64 per level (`configs/algo/dmmd.yaml`), fp32, inference mode, the output head on
every token.

    python benchmarks/noise_input_cost.py [--shapes digits text cifar --repeats 10]
Writes benchmarks/results/noise_input_cost_<time>/ (results.md, results.json, run_info.json).
"""

from __future__ import annotations

import argparse
import time

import torch

from mdlm_dmmd.models.dit import DiT, DiTConfig
from run_info import command_line, paired_ratio, ratio_cell, results_dir, run_info, write_results, write_run_info  # benchmarks/ is on sys.path

SMALL = {"hidden_dim": 768, "cond_dim": 128, "n_blocks": 12, "n_heads": 12}
SHAPES = {  # DiT config, noise grid (None: white), batch
    "digits": ({"vocab_size": 18, "length": 64, "hidden_dim": 96, "cond_dim": 64, "n_blocks": 3, "n_heads": 4},
               [8, 8, 1], 500),
    "text": ({"vocab_size": 50258, "length": 1024, **SMALL}, None, 2),
    "cifar": ({"vocab_size": 257, "length": 3072, **SMALL}, [32, 32, 3], 1),
}
NOISE_DIM = 64


def networks(config: dict, grid) -> tuple[DiT, DiT]:
    """The teacher and the same network with a noise input (a non-zero projection)."""
    torch.manual_seed(0)
    teacher = DiT(DiTConfig(**config, dropout=0.0, attn_backend="sdpa")).eval()
    student = DiT(DiTConfig(**config, dropout=0.0, attn_backend="sdpa", noise_dim=NOISE_DIM, noise_grid=grid)).eval()
    student.load_state_dict(teacher.state_dict(), strict=False)
    torch.nn.init.normal_(student.noise_proj.weight, std=0.02)
    return teacher, student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=10, help="timed pairs per shape (at least 2)")
    args = parser.parse_args()
    started = time.time()
    rows = []
    for name in args.shapes:
        config, grid, batch = SHAPES[name]
        teacher, student = networks(config, grid)
        x = torch.randint(0, config["vocab_size"], (batch, config["length"]), generator=torch.Generator().manual_seed(1))
        sigma = torch.zeros(batch)
        generator = torch.Generator().manual_seed(2)
        with torch.inference_mode():
            timed = paired_ratio(("teacher", lambda: teacher(x, sigma)),
                                 ("student", lambda: student(x, sigma, student.draw_noise(batch, config["length"], generator))),
                                 args.repeats)
        rows.append({"shape": name, "batch": batch, "length": config["length"], "hidden": config["hidden_dim"],
                     "layers": config["n_blocks"], "noise": "white" if grid is None else f"pyramid over {grid}", **timed})
        print(rows[-1], flush=True)
    lines = ["# A DiT forward with the generator noise input / without it (fp32 CPU, inference mode, "
             f"{args.repeats} back-to-back pairs, medians)", "",
             "| shape | DiT | tokens × batch | noise | teacher s | student s | student / teacher (quartiles) |",
             "|---|---|---|---|---|---|---|",
             *(f"| {r['shape']} | {r['hidden']} × {r['layers']} | {r['length']} × {r['batch']} | {r['noise']} | "
               f"{r['teacher_s']} | {r['student_s']} | {ratio_cell(r)} |" for r in rows)]
    out = results_dir("noise_input_cost")
    write_results(out, rows, lines)
    write_run_info(out, run_info(command_line("noise_input_cost.py", args), started))


if __name__ == "__main__":
    main()
