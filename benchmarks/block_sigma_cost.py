"""What conditioning a block model on σ per block saves: its training forward and backward with σ
spelled out per token vs one σ per block, side by side.

A time-conditioned block model (the uniform BD3-LM teacher of the paper's block-256 setting, and
its D-MMD student) sees [x_t, x_0], 2L tokens, each noisy block at its own σ and the clean half at
0. Spelled out per token ([B, 2L]), every layer's adaLN (cond_dim → 6·D) runs on all 2L tokens,
6·C/(12·D) of a block's matmuls (8% at D = 768, C = 128), and its [B, 2L, 6·D] output is written
and read. Per block ([B, 2L/block], the DiT's σ per segment) it runs 2L/block times per sequence
and modulates a [B, blocks, block, D] view of the activations. Same weights, same numbers up to
matmul rounding (tests/models/test_block_inputs.py).

This times both, in `--repeats` back-to-back pairs (the order alternating), and reports the
median of the pairs' ratios (the VM's speed drifts between minutes; a ratio of two best times
would not cancel it), at two shapes:
- `text`: the `small` DiT (768 wide, 12 layers, C = 128, V = 50258), L = 1024 in blocks of 256,
  batch 1 (`experiment=owt_block256_teacher`'s shape);
- `narrow`: `benchmarks/block_text.py`'s DiT (128 wide, 4 layers, C = 64) on a 2048-token BPE,
  L = 256 in blocks of 64, batch 8.

fp32, one forward and backward of the network (the loss: the mean logit). `--device cuda`
(`--bf16`: under bf16 autocast) times the same on a GPU, synchronising before each clock reading.

    python benchmarks/block_sigma_cost.py [--shapes text narrow --repeats 6 --device cpu]
Writes benchmarks/results/block_sigma_cost_<time>/ (results.md, results.json, run_info.json).
"""

from __future__ import annotations

import argparse
import time

import torch

from mdlm_dmmd.diffusion import block
from mdlm_dmmd.models.dit import DiT, DiTConfig
from run_info import command_line, paired_ratio, ratio_cell, results_dir, run_info, write_results, write_run_info  # benchmarks/ is on sys.path

SHAPES = {  # DiT config, block size, batch
    "text": ({"vocab_size": 50258, "length": 1024, "hidden_dim": 768, "cond_dim": 128, "n_blocks": 12, "n_heads": 12},
             256, 1),
    "narrow": ({"vocab_size": 2048, "length": 256, "hidden_dim": 128, "cond_dim": 64, "n_blocks": 4, "n_heads": 4},
               64, 8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=6, help="timed pairs per shape (at least 2)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast (fp32 weights)")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    precision = "bf16 autocast" if args.bf16 else "fp32"
    started = time.time()
    rows = []
    for name in args.shapes:
        config, size, batch = SHAPES[name]
        L = config["length"]
        torch.manual_seed(0)
        network = DiT(DiTConfig(**config, dropout=0.0, attn_backend="sdpa")).to(device)
        for p in network.parameters():  # no zero-init adaLN or head: every matmul does real work
            torch.nn.init.normal_(p, std=0.02)
        g = torch.Generator().manual_seed(1)
        x = torch.randint(0, config["vocab_size"], (batch, 2 * L), generator=g).to(device)  # [x_t, x_0]
        per_block = torch.cat([torch.rand(batch, L // size, generator=g) * 5, torch.zeros(batch, L // size)],
                              dim=1).to(device)
        per_token = per_block.repeat_interleave(size, dim=1)  # [B, 2L]
        mask, positions = block.training_mask(L, size, device), block.training_positions(L, device)

        def step(sigma):
            network.zero_grad(set_to_none=True)
            with autocast:
                out = network(x, sigma, attn_mask=mask, positions=positions)
            out.float().mean().backward()

        timed = paired_ratio(("per_token", lambda: step(per_token)), ("per_block", lambda: step(per_block)),
                             args.repeats, torch.cuda.synchronize if device.type == "cuda" else lambda: None)
        rows.append({"shape": name, "device": args.device, "precision": precision, "batch": batch, "length": L,
                     "block_size": size, "hidden": config["hidden_dim"], "cond": config["cond_dim"],
                     "layers": config["n_blocks"], "vocab": config["vocab_size"],
                     "analytic_adaln_share": round(6 * config["cond_dim"] / (12 * config["hidden_dim"]), 3), **timed})
        print(rows[-1], flush=True)
    lines = [f"# A block model's training forward + backward, σ per block / σ per token ({precision} {args.device}, "
             f"{args.repeats} back-to-back pairs, medians)", "",
             "| shape | DiT (D × layers, C) | V | 2L × batch, block | adaLN / block matmuls | per token s | per block s | "
             "per block / per token (quartiles) |",
             "|---|---|---|---|---|---|---|---|",
             *(f"| {r['shape']} | {r['hidden']} × {r['layers']}, {r['cond']} | {r['vocab']} | {2 * r['length']} × "
               f"{r['batch']}, {r['block_size']} | {r['analytic_adaln_share']:.1%} | {r['per_token_s']} | {r['per_block_s']} | "
               f"{ratio_cell(r)} |" for r in rows)]
    out = results_dir("block_sigma_cost")
    write_results(out, rows, lines)
    write_run_info(out, run_info(command_line("block_sigma_cost.py", args), started))


if __name__ == "__main__":
    main()
