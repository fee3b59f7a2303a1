"""Block sampler: KV-cached vs uncached, and a plain (non-block) model of the same size, side by side.

A block model samples L tokens in L / block_size blocks, `k` steps each. With the KV cache a
step feeds the network one block (block_size new tokens attending to the cached prefix); without
it a step re-reads [prefix, block]. A plain diffusion model of the same size feeds all L tokens
at every step. This times, in one process and alternating the order, best of `--repeats`:

1. one generation with the cache, without it (same tokens: tests/diffusion/test_block.py), and a
   plain model taking as many steps in all (k · L / block_size) over the whole sequence;
2. one cached forward of a block at prefix lengths T = 0, block, 2·block, ...: the growth is the
   attention over the cache (O(block · T)); projections and MLP cost the same at every T. The
   analytic FLOP share of attention per T is printed next to it.

Next to the measured cached / uncached ratio it prints the same ratio by multiply-adds
(`flop_ratio`): the output head costs the same in both samplers and the cache adds its commit
passes, so at 4 steps per block the cache saves at most 52% of the work (0.478), at 16 steps 59%
(0.413); the rest of the gap is the cached path's smaller calls and the sampler's own per-step
work (softmax and cumsum over V), which the cache does not shrink. With `--process uniform` (a
time-conditioned uniform model, the paper's block-256 teacher) every step re-draws every token of
its block, so the head runs on the whole block at every step and the floor rises (0.530 at 4
steps per block: above 0.5, 0.487 at 16).

Random weights (speed does not depend on them), the `small` DiT by default (768 wide, 12 layers,
12 heads, V = 50258), fp32 on the CPU, masked process unless `--process uniform`, `--batch`
sequences at once (default 1, the latency case; `sampling.batch_size` is 64 by default, and at
batch 1 the cached path's 256-row matmuls may run at a lower rate per row than the uncached
path's longer ones: each call streams its weights from memory for fewer rows; `--profile`
measures it). `--without-plain`
leaves out the plain model (its time grows with the batch and is not part of the ratio).
`--device cuda` (`--bf16`: under bf16 autocast, `--attn`: the attention backend) times the same on
a GPU, synchronising before each clock reading. `--profile` adds one profiled generation of each
block sampler (torch.profiler, CPU): each op's own time, summed by kind — the trunk's matmuls,
the output head (matmuls with V columns), attention, the rest.

    python benchmarks/block_sampler_speed.py [--length 1024 --block-size 256 --steps 4 --repeats 2 --batch 1]
Writes benchmarks/results/block_sampler_speed_<time>/ (results.md, results.json, run_info.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from mdlm_dmmd.denoiser import BlockDenoiser, Denoiser
from mdlm_dmmd.diffusion.block_sampling import BlockSampler
from mdlm_dmmd.diffusion.masked import MaskedProcess
from mdlm_dmmd.diffusion.uniform import UniformProcess
from mdlm_dmmd.diffusion.sampling import sample
from mdlm_dmmd.diffusion.schedules import LogLinear
from mdlm_dmmd.models.dit import DiT, DiTConfig

from run_info import command_line, run_info, write_run_info  # benchmarks/ is on sys.path when run as a script


def timed(fn) -> float:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def attention_share(block: int, prefix: int, width: int) -> float:
    """FLOP share of attention scores and weighted values (4·K·(T+K)·D per layer) against the
    QKV/output projections and the 4x MLP (24·K·D² per layer), for K new tokens after T cached."""
    attention = 4 * block * (prefix + block) * width
    dense = 24 * block * width * width
    return attention / (attention + dense)


def flop_ratio(length: int, block: int, steps: int, width: int, layers: int, vocab: int,
               process: str = "masked") -> float:
    """Cached / uncached multiply-adds of one generation by counting (batch-independent): per layer
    12·D² per token (QKV, output projection, 4x MLP) and 2·D per (query, key) pair of attention
    (the uncached mask hides keys but the kernel computes them); a commit pass is a block through
    every layer but the last, which stops at its QKV; the output head (D·V per token) runs, in
    both, once per token at the step that reveals it (masked process) or on every token of the
    block at every step (uniform process, whose steps re-draw every token). The floor the wall-clock
    ratio approaches when every call runs its matmuls at the same rate. It assumes every step
    calls the network: a masked step that reveals nothing is skipped (`block_sampling`), which
    at 256-token blocks does not happen in practice, but with small blocks and many steps it
    does, and the true ratio is then above this one."""
    def layer(rows: int, keys: int) -> int:
        return rows * 12 * width * width + 2 * rows * keys * width

    cached = uncached = 0
    for j in range(length // block):
        before = j * block
        cached += steps * layers * layer(block, before + block)
        uncached += steps * layers * layer(before + block, before + block)
        if before + block < length:  # commit this block (not the last)
            cached += (layers - 1) * layer(block, before + block) + block * 3 * width * width
    head = length * width * vocab * (1 if process == "masked" else steps)
    return (cached + head) / (uncached + head)


MATMULS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear")


def op_kind(name: str, shapes: list, vocab: int) -> str:
    if name in MATMULS:
        return "output head" if any(vocab in shape for shape in shapes if shape) else "trunk matmuls"
    return "attention" if "attention" in name else "other"


def profiled(generate, vocab: int) -> dict:
    """One call of `generate` under torch.profiler: each op's own CPU time summed by `op_kind`
    (seconds), and per matmul weight shape the rows multiplied and the seconds taken."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        generate()
    seconds: dict[str, float] = {}
    by_weight: dict[str, dict] = {}
    others: dict[str, float] = {}
    for event in prof.key_averages(group_by_input_shape=True):
        kind = op_kind(event.key, event.input_shapes, vocab)
        seconds[kind] = seconds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
        if kind == "other":
            others[event.key] = others.get(event.key, 0.0) + event.self_cpu_time_total / 1e6
        matrices = [shape for shape in event.input_shapes if shape and len(shape) == 2]
        if event.key in MATMULS and len(matrices) >= 2:  # (input [rows, k], weight [k, n])
            entry = by_weight.setdefault("x".join(map(str, matrices[-1])), {"rows": 0, "seconds": 0.0})
            entry["rows"] += event.count * matrices[-2][0]
            entry["seconds"] += event.self_cpu_time_total / 1e6
    seconds["total"] = sum(seconds.values())
    return {"seconds": seconds, "matmuls": by_weight, "other_ops": others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="steps per block")
    parser.add_argument("--vocab", type=int, default=50258)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="sequences sampled at once")
    parser.add_argument("--process", choices=["masked", "uniform"], default="masked",
                        help="uniform: a time-conditioned uniform model, the paper's block-256 teacher")
    parser.add_argument("--without-plain", action="store_true", help="time only the two block samplers")
    parser.add_argument("--profile", action="store_true",
                        help="also split one generation of each block sampler by op kind")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="sample under bf16 autocast (fp32 weights)")
    parser.add_argument("--attn", default="sdpa", help="model.attn_backend (auto, sdpa, flex, flash)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.time()
    out = args.out or Path("benchmarks/results") / f"block_sampler_speed_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
    L, K, k = args.length, args.block_size, args.steps
    blocks = L // K

    torch.manual_seed(0)
    network = DiT(DiTConfig(vocab_size=args.vocab, length=L, hidden_dim=args.hidden, cond_dim=128,
                            n_blocks=args.layers, n_heads=args.heads, dropout=0.0, attn_backend=args.attn)).eval()
    torch.nn.init.normal_(network.output_layer.linear.weight, std=0.02)  # not the zero-init head: real sampling work
    network.to(device)
    uniform = args.process == "uniform"
    process = UniformProcess(LogLinear(), vocab_size=args.vocab) if uniform else MaskedProcess(LogLinear(),
                                                                                              mask_id=args.vocab - 1)
    block_denoiser = BlockDenoiser(network, process, time_conditioning=uniform, block_size=K)
    plain_denoiser = Denoiser(network, process, time_conditioning=uniform)

    def generation(kind: str):
        generator = torch.Generator(device=device).manual_seed(1)
        if kind == "plain":
            return lambda: sample(plain_denoiser, process, steps=k * blocks, shape=(args.batch, L), generator=generator,
                                  device=device)
        return lambda: BlockSampler(process, K, kv_cache=kind == "cached")(block_denoiser, steps=k, shape=(args.batch, L),
                                                                           generator=generator, device=device)

    kinds = ("cached", "uncached") if args.without_plain else ("cached", "uncached", "plain")
    best = {kind: float("inf") for kind in kinds}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    with torch.no_grad(), autocast:
        for repeat in range(args.repeats):
            for kind in (kinds if repeat % 2 == 0 else kinds[::-1]):
                best[kind] = min(best[kind], timed(generation(kind)))
                print(f"repeat {repeat}: {kind} {best[kind]:.2f} s", flush=True)

        # a cached forward of one block after T cached tokens
        split = None if not args.profile else \
            {kind: profiled(generation(kind), args.vocab) for kind in ("cached", "uncached")}
        per_prefix = []
        tokens = torch.randint(0, args.vocab - 1, (1, L), generator=torch.Generator().manual_seed(2)).to(device)
        for j in range(blocks):
            cache = block_denoiser.new_cache()
            for i in range(j):
                block_denoiser.commit(tokens[:, i * K:(i + 1) * K], cache)
            z = tokens[:, j * K:(j + 1) * K]
            t = torch.ones(1, device=device)
            seconds = min(timed(lambda: block_denoiser.block_log_probs(z, t, kv_cache=cache)) for _ in range(args.repeats))
            per_prefix.append({"prefix": j * K, "seconds": seconds, "attention_flop_share": attention_share(K, j * K, args.hidden)})
            print(per_prefix[-1], flush=True)

    result = {
        "length": L, "block_size": K, "steps_per_block": k, "vocab": args.vocab, "hidden": args.hidden,
        "layers": args.layers, "heads": args.heads, "batch": args.batch, "process": args.process,
        "dtype": "bf16 autocast" if args.bf16 else "float32", "device": args.device,
        "attn_backend": args.attn,
        "seconds": best, "cached_over_uncached": best["cached"] / best["uncached"],
        "flop_ratio": flop_ratio(L, K, k, args.hidden, args.layers, args.vocab, args.process),
        "cached_over_plain": best["cached"] / best["plain"] if "plain" in best else None,
        "tokens_per_step": {"cached": K, "uncached": [K * (j + 1) for j in range(blocks)], "plain": L},
        "nfe": {"cached": k * blocks + blocks - 1, "uncached": k * blocks, "plain": k * blocks},
        "per_prefix": per_prefix, "profile_seconds": split,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Block sampler speed: {L} tokens in blocks of {K}, {k} steps per block ({result['device']}, "
        f"{result['dtype']}, attention {args.attn}, batch {args.batch}, {args.process} process)",
        "",
        f"DiT {args.hidden} wide, {args.layers} layers, {args.heads} heads, V = {args.vocab}; best of {args.repeats}, "
        "the generations alternating in one process.",
        "",
        "| sampler | tokens fed per step | NFE | seconds | vs cached |",
        "|---|---|---|---|---|",
        f"| block, KV cache | {K} | {k * blocks} + {blocks - 1} commits | {best['cached']:.2f} | 1.00 |",
        f"| block, no cache | {K}..{L} | {k * blocks} | {best['uncached']:.2f} | {best['uncached'] / best['cached']:.2f} |",
        *([f"| plain diffusion, same NFE | {L} | {k * blocks} | {best['plain']:.2f} | {best['plain'] / best['cached']:.2f} |"]
          if "plain" in best else []),
        "",
        f"**cached / uncached = {result['cached_over_uncached']:.2f}** (target ≤ 0.5 at `model=small`); "
        f"by multiply-adds {result['flop_ratio']:.3f} (`flop_ratio`: the floor when every call runs at the same rate).",
        "",
        "One cached forward of a block after T cached tokens (batch 1):",
        "",
        "| T (cached tokens) | seconds | analytic attention FLOP share |",
        "|---|---|---|",
        *(f"| {r['prefix']} | {r['seconds']:.3f} | {r['attention_flop_share']:.1%} |" for r in per_prefix),
        "",
    ]
    if split:
        cached, uncached = split["cached"]["seconds"], split["uncached"]["seconds"]
        lines += ["One profiled generation of each (each op's own CPU time, seconds, summed by kind):", "",
                  "| ops | KV cache | no cache | cached / uncached |", "|---|---|---|---|",
                  *(f"| {kind} | {cached.get(kind, 0):.2f} | {uncached.get(kind, 0):.2f} | "
                    f"{cached.get(kind, 0) / max(uncached.get(kind, 0), 1e-9):.2f} |"
                    for kind in ("trunk matmuls", "output head", "attention", "other", "total")), "",
                  "Matmuls by weight shape: rows multiplied and µs per row, in the same two generations:", "",
                  "| weight | rows, cache | rows, no cache | µs / row, cache | µs / row, no cache |", "|---|---|---|---|---|"]
        mine, theirs = split["cached"]["matmuls"], split["uncached"]["matmuls"]
        for weight in sorted(mine, key=lambda w: -mine[w]["seconds"])[:8]:
            a, b = mine[weight], theirs.get(weight, {"rows": 0, "seconds": 0.0})
            lines.append(f"| {weight} | {a['rows']} | {b['rows']} | {1e6 * a['seconds'] / max(a['rows'], 1):.1f} | "
                         f"{1e6 * b['seconds'] / max(b['rows'], 1):.1f} |")
        lines += ["", "The largest of the other ops (seconds):", "", "| op | KV cache | no cache |", "|---|---|---|"]
        mine, theirs = split["cached"]["other_ops"], split["uncached"]["other_ops"]
        for op in sorted(mine, key=lambda o: -mine[o])[:10]:
            lines.append(f"| {op} | {mine[op]:.3f} | {theirs.get(op, 0.0):.3f} |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))
    write_run_info(out, run_info(command_line("block_sampler_speed.py", args), started))


if __name__ == "__main__":
    main()
