"""Gradient moment cost: seconds per pair vs 4 × (forward + backward) of the reference.

Issue 15, benchmark 4. A GM pair (eq. 14) needs the gradients of four minibatches (samples and
data of two halves, D = ∇(L(g) − L(d)) in one backward each) and one float64 dot product of two
flat gradient vectors; a plain training step of the same reference on one minibatch is one
forward + backward. The target is GM ≤ 1.3 × 4 (forward + backward): flattening the gradients,
the float64 dot and the row preparation may add at most 30%.

Reference: a randomly initialised GPT-2 architecture from `transformers` (no download), by
default 4 layers × 256 wide, V = 50257; rows of random ids, `--length` tokens (+ the BOS the
metric prepends; the baseline gets the same length), `--batch` rows per minibatch, fp32 CPU. GM
over `--pairs` pairs and the baseline alternate `--repeats` times in one process; best of each.

    python benchmarks/gm_cost.py [--pairs 4 --repeats 3]
Writes benchmarks/results/gm_cost_<time>/ (results.md, results.json, run_info.json).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from mdlm_dmmd.metrics.gradient_moment import gradient_moment

from run_info import command_line, results_dir, run_info, write_results, write_run_info  # benchmarks/ is on sys.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started = time.time()
    out = results_dir("gm_cost")
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(GPT2Config(vocab_size=args.vocab, n_positions=args.length + 1, n_embd=args.hidden,
                                           n_layer=args.layers, n_head=4, bos_token_id=args.vocab - 1,
                                           eos_token_id=args.vocab - 1))
    rows = 2 * args.pairs * args.batch
    samples = torch.randint(0, args.vocab - 1, (rows, args.length))
    data = torch.randint(0, args.vocab - 1, (rows, args.length))
    minibatch = torch.cat([torch.full((args.batch, 1), args.vocab - 1), samples[: args.batch]], dim=1)

    def gm() -> float:
        begin = time.perf_counter()
        gradient_moment(reference, samples, data, batch_size=args.batch, num_pairs=args.pairs)
        return (time.perf_counter() - begin) / args.pairs

    def four_steps() -> float:
        reference.eval()
        begin = time.perf_counter()
        for _ in range(4):
            logits = reference(minibatch).logits[:, :-1]
            F.cross_entropy(logits.transpose(1, 2), minibatch[:, 1:]).backward()
        reference.zero_grad(set_to_none=True)
        return time.perf_counter() - begin

    best = {"gm_pair": float("inf"), "four_fwd_bwd": float("inf")}
    for repeat in range(args.repeats):
        for name, fn in ((("gm_pair", gm), ("four_fwd_bwd", four_steps)) if repeat % 2 == 0
                         else (("four_fwd_bwd", four_steps), ("gm_pair", gm))):
            best[name] = min(best[name], fn())
        print(f"repeat {repeat}: {best}", flush=True)
    ratio = best["gm_pair"] / best["four_fwd_bwd"]
    result = {**vars(args), "seconds": best, "ratio": ratio, "target": 1.3}
    lines = [f"# Gradient moment cost (GPT-2 architecture {args.layers} × {args.hidden}, V = {args.vocab}, "
             f"{args.batch} rows × {args.length} tokens per minibatch, CPU fp32, best of {args.repeats})", "",
             "| | seconds |", "|---|---|",
             f"| one GM pair (4 minibatch gradients + float64 dot) | {best['gm_pair']:.3f} |",
             f"| 4 × (forward + backward) | {best['four_fwd_bwd']:.3f} |",
             f"| **ratio** (target ≤ 1.3) | **{ratio:.2f}** |"]
    write_results(out, result, lines)
    write_run_info(out, run_info(command_line("gm_cost.py", args), started))


if __name__ == "__main__":
    main()
