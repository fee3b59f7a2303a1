"""Masked sampler: revealed-positions-only step vs the dense posterior step, side by side.

The masked process lets `sampling.step` draw which tokens are revealed first and sample x only
there; the dense path builds float64 q(z_s | z_t, x̂) over [B, L, V] and draws from it at
every position. Both give the same distribution (tests/diffusion/test_sampling.py). This times
the sampler alone (a fixed-logits denoiser, so the network does not hide the difference) and a
whole generation with a small DiT, each configuration run with both paths in the same process,
alternating, best of `--repeats`.

    python benchmarks/sampler_speed.py [--repeats 3]
Writes benchmarks/results/sampler_speed_<time>/ (results.md, results.json, run_info.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mdlm_dmmd.diffusion.masked import MaskedProcess
from mdlm_dmmd.diffusion.sampling import sample
from mdlm_dmmd.diffusion.schedules import LogLinear
from mdlm_dmmd.models.dit import DiT, DiTConfig

from run_info import run_info, write_run_info  # benchmarks/ is on sys.path when run as a script


@dataclass(frozen=True)
class DenseMasked(MaskedProcess):
    """The masked process without the reveal-first shortcut: the sampler takes the dense path."""

    def draw_updated_positions(self, z_t, t, s, generator=None):
        return None


def fixed_logits_denoiser(process: MaskedProcess, batch: int, length: int, vocab: int):
    logits = torch.randn(batch, length, vocab, generator=torch.Generator().manual_seed(0))
    return lambda z_t, t: process.log_probs(logits, z_t)


def dit_denoiser(process: MaskedProcess, length: int, vocab: int):
    network = DiT(DiTConfig(vocab_size=vocab, length=length, hidden_dim=128, cond_dim=64, n_blocks=2, n_heads=4)).eval()
    return lambda z_t, t: process.log_probs(network(z_t, torch.zeros_like(t)), z_t)


def seconds(denoise, process, steps, shape, top_p) -> float:
    started = time.perf_counter()
    sample(denoise, process, steps=steps, shape=shape, generator=torch.Generator().manual_seed(1), top_p=top_p)
    return time.perf_counter() - started


def write_tables(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| denoiser | B | L | V | steps | top-p | dense (s) | reveal-first (s) | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['denoiser']} | {r['batch']} | {r['length']} | {r['vocab']} | {r['steps']} | {r['top_p']} | "
              f"{r['dense_s']} | {r['reveal_first_s']} | {r['speedup']}× |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started = time.time()
    out = Path("benchmarks/results") / f"sampler_speed_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
    cases = [  # (denoiser, batch, length, vocab incl. mask, steps, top_p)
        ("DiT 128x2", 16, 128, 2049, 64, 0.9),
        ("fixed logits", 16, 128, 2049, 64, 1.0),
        ("fixed logits", 16, 128, 2049, 64, 0.9),
        ("fixed logits", 4, 128, 50258, 32, 1.0),
        ("fixed logits", 4, 128, 50258, 32, 0.9),
    ]
    rows = []
    with torch.no_grad():
        for name, batch, length, vocab, steps, top_p in cases:
            fast, dense = MaskedProcess(LogLinear(), mask_id=vocab - 1), DenseMasked(LogLinear(), mask_id=vocab - 1)
            denoise = (fixed_logits_denoiser(fast, batch, length, vocab) if name == "fixed logits"
                       else dit_denoiser(fast, length, vocab))
            times = {"reveal-first": [], "dense": []}
            for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
                times["reveal-first"].append(seconds(denoise, fast, steps, (batch, length), top_p))
                times["dense"].append(seconds(denoise, dense, steps, (batch, length), top_p))
            best = {k: min(v) for k, v in times.items()}
            rows.append({"denoiser": name, "batch": batch, "length": length, "vocab": vocab, "steps": steps, "top_p": top_p,
                         "dense_s": round(best["dense"], 3), "reveal_first_s": round(best["reveal-first"], 3),
                         "speedup": round(best["dense"] / best["reveal-first"], 2)})
            print(rows[-1], flush=True)
            write_tables(out, rows)  # after every case, so a stopped run keeps what it measured
    write_run_info(out, run_info(f"python benchmarks/sampler_speed.py --repeats {args.repeats}", started))


if __name__ == "__main__":
    main()
