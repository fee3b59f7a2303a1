"""Block-by-block sampling of a block-diffusion model (BD3-LM's semi-autoregressive sampler).

Blocks are generated left to right; each block starts from the process's prior (all masks, or
uniform noise for a uniform process) and takes `steps` denoising steps on the grid t = 1 → 0
with the same step rules as plain sampling (`sampling.step`), conditioned on the finished
blocks before it. Those are clean and never change, so with `kv_cache` (the default) their keys
and values are computed once, by one extra forward pass per finished block (`commit`), and a
step feeds the network `block_size` new tokens instead of the whole prefix. Without the cache
every step re-reads [prefix, block]; both give the same tokens under the same seed.

NFE: `steps` per block, `steps · L / block_size` in all, plus (with the cache) one commit pass
per finished block but the last (`nfe`).

The sampler sees the denoiser only through `block_log_probs(z, t, prefix=, kv_cache=,
generator=)`, `new_cache()` and `commit(x, cache)` (`denoiser.BlockDenoiser`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mdlm_dmmd.diffusion.process import Process
from mdlm_dmmd.diffusion.sampling import check_prompt, check_sampling_args, step
from mdlm_dmmd.errors import UserError


def nfe(length: int, block_size: int, steps: int, kv_cache: bool) -> dict[str, int]:
    """Network evaluations of one generation: per block, in all, and the cache's commit passes."""
    blocks = length // block_size
    commits = blocks - 1 if kv_cache else 0
    return {"per_block": steps, "denoising": steps * blocks, "commit": commits, "total": steps * blocks + commits}


@torch.no_grad()
def sample_blocks(
    denoiser: Any,
    process: Process,
    *,
    block_size: int,
    steps: int,
    shape: tuple[int, int],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
    top_p: float = 1.0,
    rule: str = "ancestral",
    noise_removal: str = "ancestral",
    prompt: Tensor | None = None,
    kv_cache: bool = True,
    progress: bool = False,
) -> Tensor:
    """`shape[0]` sequences of `shape[1]` tokens, block by block, `steps` steps per block. [B, L]

    `prompt` [B, P]: the first P tokens are given; they are written into their blocks before
    every step (masked diffusion carries them over, uniform diffusion would re-noise them).
    """
    check_sampling_args(steps, temperature, top_p, rule, noise_removal)
    check_prompt(prompt, shape)
    batch, length = shape
    if length % block_size:
        raise UserError(f"block sampling: the length {length} must be a multiple of block_size {block_size}")
    times = torch.linspace(1.0, 0.0, steps + 1, device=device)
    cache = denoiser.new_cache() if kv_cache else None
    finished = torch.empty(batch, 0, dtype=torch.long, device=device)
    blocks = length // block_size
    bar = tqdm(total=blocks * steps, desc="sampling blocks", disable=not progress, leave=False)
    for j in range(blocks):
        start = j * block_size
        given = _prompt_part(prompt, start, block_size)
        z = _keep(process.prior((batch, block_size), device=device, generator=generator), given)
        for i in range(steps):
            t, s = times[i].expand(batch), times[i + 1].expand(batch)
            log_p = denoiser.block_log_probs(z, t, prefix=None if kv_cache or j == 0 else finished,
                                             kv_cache=cache, generator=generator)
            if noise_removal == "greedy" and i == steps - 1:
                z = log_p.argmax(dim=-1)
            else:
                z = step(process, log_p, z, t, s, rule=rule, temperature=temperature, top_p=top_p, generator=generator)
            z = _keep(z, given)
            bar.update()
        finished = torch.cat([finished, z], dim=1)
        if cache is not None and j < blocks - 1:
            denoiser.commit(z, cache)
    bar.close()
    return finished


def _prompt_part(prompt: Tensor | None, start: int, size: int) -> Tensor | None:
    """The prompt's tokens inside the block [start, start + size) as [B, n] (n ≤ size), or None."""
    if prompt is None or prompt.shape[1] <= start:
        return None
    return prompt[:, start: start + size]


def _keep(z: Tensor, given: Tensor | None) -> Tensor:
    if given is None:
        return z
    z = z.clone()
    z[:, : given.shape[1]] = given.to(z.device)
    return z


@dataclass(frozen=True)
class BlockSampler:
    """Block-by-block sampling of a `BlockDenoiser`; `steps` is the number of steps per block."""

    process: Process
    block_size: int
    rule: str = "ancestral"
    kv_cache: bool = True
    first_token: int | None = None  # BD3-LM's ignore_bos: every sequence starts with this token (BOS)
    autoregressive: ClassVar[bool] = False
    blockwise: ClassVar[bool] = True  # called with the denoiser object, not a (z, t) function

    def __call__(self, denoiser: Any, *, steps: int, shape: tuple[int, int], prompt: Tensor | None = None,
                 device: torch.device | str = "cpu", **options) -> Tensor:
        if prompt is None and self.first_token is not None:  # a model that never saw a noisy BOS
            prompt = torch.full((shape[0], 1), self.first_token, dtype=torch.long, device=device)
        return sample_blocks(denoiser, self.process, block_size=self.block_size, steps=steps, shape=shape,
                             rule=self.rule, kv_cache=self.kv_cache, prompt=prompt, device=device, **options)

    def nfe(self, length: int, steps: int) -> dict[str, int]:
        return nfe(length, self.block_size, steps, self.kv_cache)
