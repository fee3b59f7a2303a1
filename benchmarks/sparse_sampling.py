"""Masked sampling: the network at the revealed tokens only vs every sequence and position.

`sampling.sample` draws which tokens a masked step reveals before calling the denoiser; a
`Denoiser` (it takes `at=`) then runs the network on the sequences with a revealed token only,
with the output head at the revealed tokens only, and not at all in a step that reveals none.
A plain `(z_t, t)` function gets every sequence, with the head at every position (the dense
path). Both draw the same tokens for a model without noise input (tests/diffusion/
test_sampling.py). At V = 50k the output head is most of a narrow DiT's work, and at many steps
most steps reveal nothing in most sequences, so the gap grows with the step count.

Random weights, fp32 on the CPU, both paths in one process, alternating, best of `--repeats`.

    python benchmarks/sparse_sampling.py [--repeats 2]
Writes benchmarks/results/sparse_sampling_<time>/ (results.md, results.json, run_info.json).
"""

from __future__ import annotations

import argparse
import time

import torch

from mdlm_dmmd.denoiser import Denoiser
from mdlm_dmmd.diffusion.masked import MaskedProcess
from mdlm_dmmd.diffusion.sampling import sample
from mdlm_dmmd.diffusion.schedules import LogLinear
from mdlm_dmmd.models.dit import DiT, DiTConfig

from run_info import command_line, results_dir, run_info, write_results, write_run_info  # benchmarks/ is on sys.path


def counted(denoise, counts: dict):
    """`denoise` with the sequences and logits rows it is asked for added to `counts`."""
    def sparse(z, t, at=None):
        counts["sequences"] += z.shape[0]
        counts["head_rows"] += int(at.sum())
        return denoise(z, t, at=at)

    def dense(z, t):
        counts["sequences"] += z.shape[0]
        counts["head_rows"] += z.numel()
        return denoise(z, t)
    return sparse, dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=50258)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    started = time.time()
    out = results_dir("sparse_sampling")
    torch.manual_seed(0)
    network = DiT(DiTConfig(vocab_size=args.vocab, length=args.length, hidden_dim=args.hidden, cond_dim=64,
                            n_blocks=args.layers, n_heads=4, dropout=0.0)).eval()
    torch.nn.init.normal_(network.output_layer.linear.weight, std=0.02)  # not the zero-init head
    process = MaskedProcess(LogLinear(), mask_id=args.vocab - 1)
    denoiser = Denoiser(network, process)
    rows = []
    with torch.no_grad():
        for steps in args.steps:
            best, counts, tokens = {}, {}, {}
            for repeat in range(args.repeats):
                for kind in (("sparse", "dense") if repeat % 2 == 0 else ("dense", "sparse")):
                    counts[kind] = {"sequences": 0, "head_rows": 0}
                    denoise = dict(zip(("sparse", "dense"), counted(denoiser, counts[kind])))[kind]
                    begin = time.perf_counter()
                    tokens[kind] = sample(denoise, process, steps=steps, shape=(args.batch, args.length),
                                          generator=torch.Generator().manual_seed(1))
                    best[kind] = min(best.get(kind, float("inf")), time.perf_counter() - begin)
            assert torch.equal(tokens["sparse"], tokens["dense"])  # no noise input: the same draws
            rows.append({"steps": steps, "batch": args.batch, "length": args.length, "vocab": args.vocab,
                         "dense_s": round(best["dense"], 2), "sparse_s": round(best["sparse"], 2),
                         "speedup": round(best["dense"] / best["sparse"], 2),
                         "sequences": counts, "same_tokens": True})
            print(rows[-1], flush=True)
    lines = [f"# Masked sampling: network at the revealed tokens only vs dense (DiT {args.hidden} wide × {args.layers}, "
             f"V = {args.vocab}, B = {args.batch}, L = {args.length}; CPU fp32, best of {args.repeats})", "",
             "| steps | dense (s) | revealed only (s) | speed-up | sequences through the network (dense / sparse) "
             "| head rows (dense / sparse) | same tokens |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['steps']} | {r['dense_s']} | {r['sparse_s']} | {r['speedup']}× | "
              f"{r['sequences']['dense']['sequences']} / {r['sequences']['sparse']['sequences']} | "
              f"{r['sequences']['dense']['head_rows']} / {r['sequences']['sparse']['head_rows']} | yes |" for r in rows]
    write_results(out, rows, lines)
    write_run_info(out, run_info(command_line("sparse_sampling.py", args), started))


if __name__ == "__main__":
    main()
