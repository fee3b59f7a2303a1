"""Backbone throughput: the package's DiT vs a naive reference of the same architecture and weights.

Issue 15, benchmark 3. The reference below is written from scratch for this benchmark: the same
network (embedding, sinusoidal σ embedding, adaLN-modulated pre-norm blocks with rotary,
tanh-GELU MLP, adaLN final layer) as explicit tensor algebra with naive attention
(softmax(q kᵀ / √d) v materialised), no fused kernels. Its logits are checked against the DiT's
before anything is timed. Tokens per second, forward (no grad) and forward + backward (sum of
the logits' logsumexp), for every attention backend that runs here and, with `--compile`, for
`torch.compile` of the DiT (inductor; its compile time is excluded by a warm-up call); flex
attention has no CPU backward, so it is timed forward only. Every
variant runs `--repeats` times alternating in one process; best of each. Target: DiT / naive
≥ 1.0 on CPU.

    python benchmarks/backbone_throughput.py [--compile]
Writes benchmarks/results/backbone_throughput_<time>/ (results.md, results.json, run_info.json).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from mdlm_dmmd.models.dit import DiT, DiTConfig

from run_info import command_line, results_dir, run_info, write_results, write_run_info  # benchmarks/ is on sys.path


def naive_forward(p: dict, config: DiTConfig, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The DiT's logits [B, S, V] from its parameters `p` (state_dict names), written plainly."""
    B, S = x.shape
    D, H = config.hidden_dim, config.n_heads
    hd = D // H

    def norm(h, weight):
        return F.layer_norm(h, [D]) * weight

    def linear(h, name, bias=True):
        out = h @ p[f"{name}.weight"].T
        return out + p[f"{name}.bias"] if bias else out

    half = 128  # 256 sinusoidal features of σ
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = sigma[:, None].float() * freqs
    c = torch.cat([args.cos(), args.sin()], dim=-1)
    c = linear(F.silu(linear(c, "sigma_map.mlp.0")), "sigma_map.mlp.2")
    c = F.silu(c)[:, None]  # [B, 1, C]

    angles = torch.arange(S, dtype=torch.float32)[:, None] * p["rotary_emb.inv_freq"]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()  # [S, hd]

    def rotate(t):  # [B, H, S, hd]
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    h = p["vocab_embed.embedding"][x]
    for i in range(config.n_blocks):
        name = f"blocks.{i}"
        m = linear(c, f"{name}.adaLN_modulation").chunk(6, dim=-1)
        a = norm(h, p[f"{name}.norm1.weight"]) * (1 + m[1]) + m[0]
        q, k, v = linear(a, f"{name}.attn_qkv", bias=False).view(B, S, 3, H, hd).permute(2, 0, 3, 1, 4)
        scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(hd)  # [B, H, S, S]
        a = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, S, D)
        h = h + m[2] * linear(a, f"{name}.attn_out", bias=False)
        a = norm(h, p[f"{name}.norm2.weight"]) * (1 + m[4]) + m[3]
        a = linear(F.gelu(linear(a, f"{name}.mlp.0"), approximate="tanh"), f"{name}.mlp.2")
        h = h + m[5] * a
    shift, scale = linear(c, "output_layer.adaLN_modulation").chunk(2, dim=-1)
    return linear(norm(h, p["output_layer.norm_final.weight"]) * (1 + scale) + shift, "output_layer.linear")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50258)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the DiT (inductor)")
    args = parser.parse_args()
    started = time.time()
    out = results_dir("backbone_throughput")
    torch.manual_seed(0)
    config = DiTConfig(vocab_size=args.vocab, length=args.length, hidden_dim=args.hidden, cond_dim=128,
                       n_blocks=args.layers, n_heads=args.heads, dropout=0.0)
    networks = {}
    for backend in ("sdpa", "flex"):
        net = DiT(DiTConfig(**{**config.__dict__, "attn_backend": backend})).eval()
        with torch.no_grad():
            for param in net.parameters():  # random everywhere: no zero-init path hides work
                param.normal_(0, 0.02)
        if networks:
            net.load_state_dict(next(iter(networks.values())).state_dict())
        networks[backend] = net
    params = {k: v.detach().clone().requires_grad_(v.is_floating_point() and k != "rotary_emb.inv_freq")
              for k, v in networks["sdpa"].state_dict().items()}
    x = torch.randint(0, args.vocab, (args.batch, args.length), generator=torch.Generator().manual_seed(1))
    sigma = torch.rand(args.batch, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = naive_forward(params, config, x, sigma)
        for backend, net in networks.items():
            error = (net(x, sigma) - reference).abs().max().item()
            assert error < 1e-3 * reference.abs().max().item(), (backend, error)
    variants = {f"DiT ({b})": (lambda n=n: n(x, sigma)) for b, n in networks.items()}
    variants["naive reference"] = lambda: naive_forward(params, config, x, sigma)
    if args.compile:
        compiled = torch.compile(networks["sdpa"])
        variants["DiT (sdpa, compiled)"] = lambda: compiled(x, sigma)

    def forward(fn):
        with torch.no_grad():
            begin = time.perf_counter()
            fn()
            return time.perf_counter() - begin

    def forward_backward(fn):
        for net in networks.values():
            net.zero_grad(set_to_none=True)
        begin = time.perf_counter()
        fn().logsumexp(-1).sum().backward()
        seconds = time.perf_counter() - begin
        for value in params.values():
            value.grad = None
        return seconds

    no_backward = {"DiT (flex)"}  # torch's flex attention has no CPU backward
    for name, fn in variants.items():  # warm-up (and compilation) outside the timings
        forward(fn)
        if name not in no_backward:
            forward_backward(fn)
    best = {(name, mode): float("inf") for name in variants for mode in ("forward", "forward+backward")
            if mode == "forward" or name not in no_backward}
    for repeat in range(args.repeats):
        names = list(variants) if repeat % 2 == 0 else list(variants)[::-1]
        for name in names:
            best[(name, "forward")] = min(best[(name, "forward")], forward(variants[name]))
            if name not in no_backward:
                best[(name, "forward+backward")] = min(best[(name, "forward+backward")],
                                                       forward_backward(variants[name]))
        print(f"repeat {repeat}: " + ", ".join(f"{k[0]} {k[1]} {v:.3f}" for k, v in best.items()), flush=True)
    tokens = args.batch * args.length
    rows = [{"variant": name, "mode": mode, "seconds": seconds, "tokens_per_s": tokens / seconds,
             "vs_naive": best[("naive reference", mode)] / seconds} for (name, mode), seconds in best.items()]
    lines = [f"# DiT vs naive reference ({args.hidden} wide × {args.layers}, {args.heads} heads, V = {args.vocab}, "
             f"B = {args.batch}, L = {args.length}; CPU fp32, best of {args.repeats})", "",
             "| variant | mode | seconds | tokens/s | speed vs naive |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['mode']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {r['vs_naive']:.2f}× |"
              for r in rows]
    write_results(out, {**vars(args), "rows": rows}, lines)
    write_run_info(out, run_info(command_line("backbone_throughput.py", args), started))


if __name__ == "__main__":
    main()
