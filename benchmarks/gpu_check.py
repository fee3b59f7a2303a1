"""CUDA checks that CPU tests cannot make: attention backends, bf16, the GM metric on a GPU.

Run on a machine with a GPU (not a test; the suite stays CPU-only):

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_DATE

1. The public MDLM DiT fixture (tests/fixtures/mdlm-dit) reproduced on CUDA, fp32, by
   every available attention backend.
2. Backends side by side on the paper's "small" DiT (L = 1024, V = 50258): logits of
   flex (compiled) and flash (when installed) against SDPA, fp32 and bf16 autocast, full
   attention and a block-causal mask of block size 256 (the block-diffusion hook).
3. Forward + backward time per backend in one run (ratios, not absolute claims).
4. The gradient-moment metric on CUDA equals the CPU value (tiny GPT-2).

Writes `gpu_check.md` and `gpu_check.json` to --out; prints the same table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_info import run_info  # noqa: E402

from mdlm_dmmd.models.dit import DiT, DiTConfig, flash_attn_available  # noqa: E402

DEVICE = "cuda"  # --device cpu: a smoke run of this script on a machine without a GPU
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "mdlm-dit"  # the repository's copy: it travels


def backends() -> list[str]:
    return ["sdpa", "flex"] + (["flash"] if flash_attn_available() else [])


def randomised(model: DiT, seed: int = 0) -> DiT:
    """Non-zero weights everywhere: adaLN and the output head start at zero, which would make
    every backend agree trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:  # LayerNorm weights stay at one
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def with_backend(model: DiT, backend: str) -> DiT:
    model.config.attn_backend = backend
    return model


def check_fixture(rows: list[dict]) -> None:
    from safetensors.torch import load_file

    if not FIXTURE.is_dir():
        rows.append({"check": "fixture", "result": f"skipped: {FIXTURE} missing"})
        return
    state = load_file(str(FIXTURE / "mdlm_tiny_state_dict.safetensors"))
    io = load_file(str(FIXTURE / "mdlm_tiny_io.safetensors"))
    config = DiTConfig(vocab_size=101, length=32, hidden_dim=64, cond_dim=32, n_blocks=2, n_heads=4, dropout=0.0)
    model = DiT(config)
    model.load_state_dict(state, strict=True)
    model = model.to(DEVICE).eval()
    ids, sigma, want = io["indices"].to(DEVICE), io["sigma"].to(DEVICE), io["logits"].to(DEVICE)
    for backend in backends():
        with torch.no_grad():
            got = with_backend(model, backend)(ids, sigma)
        err = (got - want).abs().max().item()
        rows.append({"check": f"fixture logits, {DEVICE} fp32, {backend}", "max_abs_err": err, "scale": want.abs().max().item()})


def block_causal(length: int, block: int) -> torch.Tensor:
    index = torch.arange(length) // block
    return index[:, None] >= index[None, :]  # [L, L]


def check_backends(rows: list[dict], timings: list[dict], batch: int, repeats: int, size: str) -> None:
    if size == "small":  # configs/model/small.yaml at the GPT-2 vocabulary
        config = DiTConfig(vocab_size=50258, length=1024, hidden_dim=768, cond_dim=128, n_blocks=12, n_heads=12, dropout=0.0)
    else:
        config = DiTConfig(vocab_size=50, length=512, hidden_dim=32, cond_dim=16, n_blocks=1, n_heads=2, dropout=0.0)
    model = randomised(DiT(config)).to(DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, config.length), device=DEVICE, generator=g)
    sigma = torch.rand(batch, device=DEVICE, generator=g)
    mask = block_causal(config.length, 256).to(DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        for name, attn_mask in (("full", None), ("block-causal 256", mask)):
            outputs = {}
            for backend in backends():
                if backend == "flash" and attn_mask is not None:
                    continue  # flash takes no mask; the DiT routes such calls to SDPA
                with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    outputs[backend] = with_backend(model.eval(), backend)(ids, sigma, attn_mask=attn_mask)
            ref = outputs["sdpa"]
            for backend, out in outputs.items():
                if backend != "sdpa":
                    rows.append({"check": f"{backend} vs sdpa, {str(dtype)[6:]}, {name}",
                                 "max_abs_err": (out - ref).abs().max().item(), "scale": ref.abs().max().item()})
    model.train()
    for dtype in (torch.float32, torch.bfloat16):
        for backend in backends():
            if DEVICE == "cpu" and backend == "flex":
                continue  # torch's flex attention has no CPU backward
            with_backend(model, backend)
            ms = time_step(model, ids, sigma, dtype, repeats)
            timings.append({"backend": backend, "dtype": str(dtype)[6:], "batch": batch, "length": config.length,
                            "ms_per_fwd_bwd": ms})
    base = {t["dtype"]: t["ms_per_fwd_bwd"] for t in timings if t["backend"] == "sdpa"}
    for t in timings:
        t["speed_vs_sdpa_same_dtype"] = base[t["dtype"]] / t["ms_per_fwd_bwd"]
        t["speed_vs_sdpa_fp32"] = base["float32"] / t["ms_per_fwd_bwd"]


def time_step(model: DiT, ids, sigma, dtype, repeats: int) -> float:
    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(ids, sigma).logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and flex compilation)
        step()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync()
    return (time.perf_counter() - start) * 1000 / repeats


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check_gradient_moment(rows: list[dict]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from mdlm_dmmd.metrics.gradient_moment import gradient_moment

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=127, eos_token_id=127)
    model = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(3)
    samples = torch.randint(0, 127, (64, 32), generator=g)
    data = torch.randint(0, 64, (64, 32), generator=g)
    cpu = gradient_moment(model, samples, data, batch_size=8)
    gpu = gradient_moment(model.to(DEVICE), samples.to(DEVICE), data.to(DEVICE), batch_size=8)
    rows.append({"check": f"gradient_moment {DEVICE} vs cpu (fp32)", "max_abs_err": abs(gpu.mean - cpu.mean),
                 "scale": abs(cpu.mean)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--size", choices=["small", "tiny"], default="small", help="DiT for checks 2-3")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    started = time.time()
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    rows, timings = [], []
    check_fixture(rows)
    check_gradient_moment(rows)
    check_backends(rows, timings, args.batch, args.repeats, args.size)
    info = run_info("python " + " ".join(sys.argv), started, gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "none (cpu smoke run)",
                    flash_attn=flash_attn_available())
    (args.out / "gpu_check.json").write_text(json.dumps({"info": info, "checks": rows, "timings": timings}, indent=1))
    lines = ["# GPU check\n", *(f"- {k}: {v}" for k, v in info.items()), "",
             "| check | max abs err | max abs value |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r.get('max_abs_err', r.get('result'))} | {r.get('scale', '')} |")
    lines += ["", "| backend | dtype | batch x length | ms per fwd+bwd | speed vs sdpa (same dtype) | speed vs sdpa fp32 |",
              "|---|---|---|---|---|---|"]
    for t in timings:
        lines.append(f"| {t['backend']} | {t['dtype']} | {t['batch']} x {t['length']} | {t['ms_per_fwd_bwd']:.1f} | "
                     f"{t['speed_vs_sdpa_same_dtype']:.2f} | {t['speed_vs_sdpa_fp32']:.2f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "gpu_check.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
