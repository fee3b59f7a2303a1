"""Block-by-block sampling of a block-diffusion model (BD3-LM's semi-autoregressive sampler).

Blocks are generated left to right; each block starts from the process's prior (all masks, or
uniform noise for a uniform process) and takes `steps` denoising steps on the grid t = 1 → 0
with the same step rules as plain sampling (`sampling.step`), conditioned on the finished
blocks before it. Those are clean and never change, so with `kv_cache` (the default) their keys
and values are computed once, by one extra forward pass per finished block (`commit`), and a
step feeds the network `block_size` new tokens instead of the whole prefix. Without the cache
every step re-reads [prefix, block]; both give the same tokens under the same seed up to the
model's length (past it, in a sliding window, cached keys of deeper layers still carry the
dropped blocks, so the two differ).

NFE: `steps` per block (`steps + 1` with `noise_removal="greedy_tail"`, whose k steps end at
t = 1e-5 before one more call per block: `sampling.greedy_tail`), times `L / block_size` in
all, plus (with the cache) one commit pass per finished block but the last (`nfe`); a commit
pass stops at the last layer's keys and values (no output head), so it costs less than a
denoising step. With a masked process the tokens a step reveals are drawn before the network
is called (whether a token is revealed does not depend on x), the output head runs at those
positions only, and a step that reveals nothing (possible when few masks are left, or a prompt
fills the block) makes no call at all: `nfe` is then an upper bound.

Options of BD3-LM's sampler: `first_hitting` (masked process; Zheng et al. 2024): each step
reveals exactly one masked token per sequence, chosen uniformly, at the time t·u^(1/n) when the
first of the n masked tokens would be revealed, so a block takes as many steps as it has masks
and `steps` is ignored; `nucleus="drop"` (the token that crosses top-p dropped, as BD3-LM);
`stop_at` an EOS id (BD3-LM's var_length); `context` (a sliding window for sequences longer than
the model); `entropy_redraw` (BD3-LM's `_check_stop_conds`, off by default: a sample whose last
256 tokens at some block boundary have a unigram entropy below 4 nats is drawn again, up to 10
times; the number of re-draws is reported through `stats`).

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
from mdlm_dmmd.diffusion.sampling import (adjust, check_prompt, check_sampling_args, greedy_step, greedy_tail,
                                          network_calls, sample_categorical, step, time_grid)
from mdlm_dmmd.errors import UserError


def nfe(length: int, block_size: int, steps: int, kv_cache: bool, noise_removal: str = "ancestral") -> dict[str, int]:
    """Network evaluations of one generation: per block (k, or k + 1 with Duo's greedy tail),
    in all, and the cache's commit passes."""
    blocks = length // block_size
    per_block = network_calls(steps, noise_removal)
    commits = blocks - 1 if kv_cache else 0
    return {"per_block": per_block, "denoising": per_block * blocks, "commit": commits,
            "total": per_block * blocks + commits}


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
    first_hitting: bool = False,
    nucleus: str = "keep",
    stop_at: int | None = None,
    context: int | None = None,
    progress: bool = False,
) -> Tensor:
    """`shape[0]` sequences of `shape[1]` tokens, block by block, `steps` steps per block. [B, L]

    `prompt` [B, P]: the first P tokens are given; they are written into their blocks before
    every step (masked diffusion carries them over, uniform diffusion would re-noise them).
    `stop_at` (an EOS id): a sequence ends at its first `stop_at` after position 0 (BD3-LM's
    var_length: the second EOS when the first token is BOS = EOS); the rest is filled with it,
    and no further block is generated once every sequence has ended.
    `context` (the model's length): a sequence longer than it is generated with a sliding window;
    a block sees the last `context − block_size` tokens before it (with the cache: the cached
    keys of those tokens, computed when their own blocks were committed; without: the tokens,
    re-read, so the two differ once the window slides).
    """
    check_sampling_args(steps, temperature, top_p, rule, noise_removal, nucleus)
    check_prompt(prompt, shape)
    batch, length = shape
    if length % block_size:
        raise UserError(f"block sampling: the length {length} must be a multiple of block_size {block_size}")
    context = length if context is None else context
    if context % block_size or context < block_size:
        raise UserError(f"block sampling: the context {context} must be a positive multiple of block_size {block_size}")
    if first_hitting and not process.deterministic_prior:
        raise UserError("sampling.first_hitting reveals one masked token per step: it needs a masked-process model")
    times = time_grid(steps, noise_removal, device)
    cache = denoiser.new_cache() if kv_cache else None
    finished = torch.empty(batch, 0, dtype=torch.long, device=device)
    blocks = length // block_size
    bar = tqdm(total=blocks * steps, desc="sampling blocks", disable=not progress, leave=False)
    for j in range(blocks):
        start = j * block_size
        given = _prompt_part(prompt, start, block_size)
        z = _keep(process.prior((batch, block_size), device=device, generator=generator), given)
        window = finished[:, max(0, start + block_size - context):]  # the prefix a block may see
        if cache is not None and cache.length + block_size > context:
            cache.drop_first(cache.length + block_size - context)
        if first_hitting:
            z = _first_hitting_block(denoiser, process, z, given, window, cache, generator,
                                     temperature=temperature, top_p=top_p, nucleus=nucleus)
            bar.update(steps)
        for i in range(0 if first_hitting else steps):
            t, s = times[i].expand(batch), times[i + 1].expand(batch)
            # masked process: the tokens this step reveals are drawn first, x̂ is computed there only
            updated = process.draw_updated_positions(z, t, s, generator)
            bar.update()
            if updated is not None and not updated.any():
                continue  # nothing revealed: z_s = z_t, no network call
            log_p = denoiser.block_log_probs(z, t, prefix=None if kv_cache or j == 0 else window,
                                             kv_cache=cache, generator=generator, at=updated)
            if noise_removal == "greedy" and i == steps - 1:
                z = greedy_step(z, log_p, updated)
            else:
                z = step(process, log_p, z, t, s, rule=rule, temperature=temperature, top_p=top_p, nucleus=nucleus,
                         generator=generator, updated=updated, last=i == steps - 1 and noise_removal != "greedy_tail")
            z = _keep(z, given)
        if noise_removal == "greedy_tail":  # Duo's: one more call at t = 1e-5 per block, argmax x̂
            prefix = None if kv_cache or j == 0 else window
            z = _keep(greedy_tail(lambda z_, t_, at: denoiser.block_log_probs(
                z_, t_, prefix=prefix, kv_cache=cache, generator=generator, at=at), process, z), given)
        finished = torch.cat([finished, z], dim=1)
        if stop_at is not None:
            finished = _end_at(finished, stop_at)
            if (finished[:, 1:] == stop_at).any(dim=1).all() and j < blocks - 1:
                bar.close()
                return torch.cat([finished, finished.new_full((batch, length - finished.shape[1]), stop_at)], dim=1)
        if cache is not None and j < blocks - 1:
            denoiser.commit(finished[:, start:], cache)  # the block as kept (EOS-filled after a stop)
    bar.close()
    return finished


REDRAW_TRIES, REDRAW_WINDOW, REDRAW_ENTROPY = 10, 256, 4.0  # BD3-LM's `_check_stop_conds`


def low_entropy(x: Tensor, block_size: int) -> Tensor:
    """Rows whose last 256 tokens, at some block boundary past 256 tokens, have a unigram
    entropy (nats) below 4: BD3-LM's sign of a degenerate, repeating sample. [B] bool"""
    low = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for end in range(block_size, x.shape[1] + 1, block_size):
        if end <= REDRAW_WINDOW:
            continue
        window = x[:, end - REDRAW_WINDOW: end]
        for row in range(x.shape[0]):
            counts = torch.bincount(window[row]).double()
            p = counts[counts > 0] / REDRAW_WINDOW
            low[row] |= bool(-(p * p.log()).sum() < REDRAW_ENTROPY)
    return low


def _end_at(x: Tensor, eos: int) -> Tensor:
    """Every token after a sequence's first `eos` at a position ≥ 1 set to `eos`."""
    hit = (x == eos)
    hit[:, 0] = False
    after = (hit.cumsum(dim=1) - hit.long()) > 0  # strictly after the first hit
    return x.masked_fill(after, eos)


def _first_hitting_block(denoiser, process, z, given, finished, cache, generator, **adjust_options) -> Tensor:
    """Denoise one masked block with the first-hitting rule: per step and sequence, one masked
    token (uniform among the masked ones) is drawn from x̂ at t ← t · u^(1/n), n = masks left."""
    batch = z.shape[0]
    rows = torch.arange(batch, device=z.device)
    t = torch.ones(batch, dtype=torch.float64, device=z.device)
    while True:
        masked = process.denoising_positions(z)  # [B, K]
        left = masked.sum(dim=1)  # [B]
        if not left.any():
            return z
        u = torch.rand(batch, dtype=torch.float64, device=z.device, generator=generator)
        t = torch.where(left > 0, t * u ** (1.0 / left.clamp_min(1)), t)
        weights = torch.rand(masked.shape, dtype=torch.float64, device=z.device, generator=generator) * masked
        position = weights.argmax(dim=1)  # a uniform masked position (none: ignored below)
        active = left > 0
        at = torch.zeros_like(masked)
        at[rows[active], position[active]] = True  # x̂ is computed at the revealed token only
        log_p = denoiser.block_log_probs(z, t.float(), prefix=None if cache is not None or not finished.shape[1]
                                         else finished, kv_cache=cache, generator=generator, at=at)
        z = z.clone()
        z[rows[active], position[active]] = sample_categorical(adjust(log_p, **adjust_options), generator)
        z = _keep(z, given)


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
                 device: torch.device | str = "cpu", kv_cache: bool | None = None, entropy_redraw: bool = False,
                 stats: dict | None = None, **options) -> Tensor:
        """`kv_cache` None: the sampler's own setting; `entropy_redraw` (module docstring) adds its
        re-draw count to `stats["entropy_redraws"]`; other options as `sample_blocks`."""
        if prompt is None and self.first_token is not None:  # a model that never saw a noisy BOS
            prompt = torch.full((shape[0], 1), self.first_token, dtype=torch.long, device=device)

        def draw(rows: int, rows_prompt: Tensor | None) -> Tensor:
            return sample_blocks(denoiser, self.process, block_size=self.block_size, steps=steps, shape=(rows, shape[1]),
                                 rule=self.rule, kv_cache=self.kv_cache if kv_cache is None else kv_cache,
                                 prompt=rows_prompt, device=device, **options)

        x = draw(shape[0], prompt)
        if entropy_redraw:
            for _ in range(REDRAW_TRIES):
                low = low_entropy(x, self.block_size)
                if not low.any():
                    break
                if stats is not None:
                    stats["entropy_redraws"] = stats.get("entropy_redraws", 0) + int(low.sum())
                x[low] = draw(int(low.sum()), None if prompt is None else prompt[low])
        return x

    def nfe(self, length: int, steps: int, kv_cache: bool | None = None, first_hitting: bool = False,
            noise_removal: str = "ancestral") -> dict[str, int]:
        """Network evaluations per sequence (first hitting: one per masked token, `steps` and the
        greedy tail ignored; counted as `block_size` per block, an upper bound when a prompt or
        BOS fills part of one)."""
        if first_hitting:
            return nfe(length, self.block_size, self.block_size, self.kv_cache if kv_cache is None else kv_cache)
        return nfe(length, self.block_size, steps, self.kv_cache if kv_cache is None else kv_cache, noise_removal)
