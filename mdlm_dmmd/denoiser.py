"""A denoiser: network + process + time conditioning + noise input, as one call.

Losses (training) and samplers (generation) call the same object, so a model is evaluated one
way only. `Denoiser(z_t, t)` gives x̂(z_t) as log-probs [B, L, V]; `BlockDenoiser` does the same
for a block-diffusion network (BD3-LM layouts: [z_t, x_0] in training, one block on a clean
prefix or a KV cache when sampling); `CausalDenoiser(inputs)` the next-token log-probs of an
autoregressive network. None of them knows how its network was trained.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from mdlm_dmmd.diffusion import block
from mdlm_dmmd.diffusion.process import Process
from mdlm_dmmd.models.dit import DiT
from mdlm_dmmd.models.kv_cache import KVCache


@functools.lru_cache(maxsize=None)
def _overwrites(process_type: type) -> bool:
    """Whether a process's `log_probs` takes `overwrite=` (may reuse the logits it is given:
    the masked process); other processes, plugins included, are called without it."""
    try:
        return "overwrite" in inspect.signature(process_type.log_probs).parameters
    except (AttributeError, TypeError, ValueError):
        return False


@dataclass
class Denoiser:
    network: DiT
    process: Process
    time_conditioning: bool = False

    def to_log_probs(self, logits: Tensor, z: Tensor) -> Tensor:
        """The process's log-probs of the network's fresh `logits`, handed over (`overwrite`)."""
        if _overwrites(type(self.process)):
            return self.process.log_probs(logits, z, overwrite=True)
        return self.process.log_probs(logits, z)

    def sigma(self, t: Tensor) -> Tensor:
        """The network's conditioning σ(t); zeros when it is not time-conditioned."""
        return self.process.schedule.sigma(t) if self.time_conditioning else torch.zeros_like(t)

    def log_probs(self, z_t: Tensor, t: Tensor, generator: torch.Generator | None = None, *,
                  at: Tensor | None = None) -> Tensor:
        """x̂(z_t) as log-probs [B, L, V]; a noise-input network gets fresh noise on every call,
        so a noise-conditioned student can never be evaluated without its noise. `at` (bool
        [B, L], token ids only): x̂ at those positions only, [N, V] (the output head runs there)."""
        batch, length = z_t.shape[:2]
        noise = self.network.draw_noise(batch, length, generator=generator, device=z_t.device)
        logits = self.network(z_t, self.sigma(t), noise=noise, logits_at=at)
        return self.to_log_probs(logits, z_t if at is None else z_t[at])

    def __call__(self, z_t: Tensor, t: Tensor, generator: torch.Generator | None = None, *,
                 at: Tensor | None = None) -> Tensor:
        return self.log_probs(z_t, t, generator, at=at)


@dataclass
class BlockDenoiser(Denoiser):
    """A block-diffusion network (BD3-LM's layouts, `diffusion/block.py`) over blocks of
    `block_size` tokens.

    Time conditioning, where on: noisy tokens get their own block's σ(t), clean (prefix, cached,
    x_0) tokens σ = 0, in training, uncached and cached sampling alike, so the keys and values
    of a clean block are the same in all three and a KV cache is exact. A noise input is fed to
    noisy tokens only (zeros on clean ones).
    """

    block_size: int = 0  # required; a default only because the fields before it have one

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"BlockDenoiser needs block_size, a positive int; got {self.block_size!r}")

    def log_probs(self, z_t: Tensor, t: Tensor, generator: torch.Generator | None = None, *,
                  clean: Tensor | None = None, at: Tensor | None = None) -> Tensor:
        """Training layout: x̂ for every block of z_t [B, L] (ids or soft [B, L, V]), t per token
        [B, L] (constant inside each block; `block.per_token`) or per sequence [B], given the
        clean sequence `clean` [B, L]: the network sees
        [z_t, x_0] (2L tokens) under the block-diffusion mask, positions 0..L−1 for each half.
        `at` (bool [B, L], token ids only): x̂ at those positions of z_t only, [N, V]."""
        if clean is None:
            raise ValueError("BlockDenoiser.log_probs needs the clean sequence (clean=x_0): block j of z_t "
                             "is denoised given the clean blocks before it")
        batch, length = z_t.shape[:2]
        device = z_t.device
        x0 = clean if not z_t.is_floating_point() else \
            torch.nn.functional.one_hot(clean, z_t.shape[-1]).to(z_t.dtype)
        noise = self.network.draw_noise(batch, length, generator=generator, device=device)
        logits = self.network(
            torch.cat([z_t, x0], dim=1), self._sigma(t, batch, length, after=length),
            noise=None if noise is None else torch.cat([noise, torch.zeros_like(noise)], dim=1),
            attn_mask=block.training_mask(length, self.block_size, device),
            positions=block.training_positions(length, device),
            logits_at=None if at is None else torch.cat([at, torch.zeros_like(at)], dim=1))
        if at is not None:
            return self.to_log_probs(logits, z_t[at])
        return self.to_log_probs(logits[:, :length], z_t)

    def __call__(self, z_t: Tensor, t: Tensor, generator: torch.Generator | None = None, *,
                 clean: Tensor | None = None, at: Tensor | None = None) -> Tensor:
        return self.log_probs(z_t, t, generator, clean=clean, at=at)

    def block_log_probs(self, z_block: Tensor, t: Tensor, *, prefix: Tensor | None = None,
                        kv_cache: KVCache | None = None, generator: torch.Generator | None = None,
                        at: Tensor | None = None) -> Tensor:
        """Sampling: x̂ for one noisy block z_block [B, K] at time t [B], given the clean tokens
        before it either as ids `prefix` [B, P] (P a multiple of block_size; the network sees
        [prefix, z_block] block-causally, positions 0..P+K−1) or as `kv_cache` (only z_block is
        fed, at positions T..T+K−1). Both give the same numbers up to kernel rounding. `at`
        (bool [B, K]): x̂ at those positions of the block only, [N, V]."""
        batch, size = z_block.shape
        device = z_block.device
        noise = self.network.draw_noise(batch, size, generator=generator, device=device)
        if kv_cache is not None:
            if prefix is not None:
                raise ValueError("block_log_probs: give the clean prefix as tokens or as a KV cache, not both")
            logits = self.network(z_block, self._sigma(t, batch, size), noise=noise, kv_cache=kv_cache, logits_at=at)
        else:
            before = 0 if prefix is None else prefix.shape[1]
            if before % self.block_size:
                raise ValueError(f"block_log_probs: the prefix ({before} tokens) must be whole blocks of {self.block_size}")
            tokens = z_block if prefix is None else torch.cat([prefix, z_block], dim=1)
            at_tokens = (torch.cat([at.new_zeros(batch, before), at], dim=1) if at is not None
                         else torch.cat([z_block.new_zeros(batch, before, dtype=torch.bool),
                                         z_block.new_ones(batch, size, dtype=torch.bool)], dim=1))
            logits = self.network(
                tokens, self._sigma(t, batch, size, before=before),
                noise=None if noise is None else torch.cat([noise.new_zeros(batch, before, noise.shape[-1]), noise], dim=1),
                attn_mask=block.block_causal_mask(before + size, self.block_size, device), logits_at=at_tokens)
            if at is None:
                logits = logits.view(batch, size, -1)
        return self.to_log_probs(logits, z_block if at is None else z_block[at])

    def new_cache(self) -> KVCache:
        return KVCache()

    def commit(self, x_block: Tensor, kv_cache: KVCache) -> None:
        """Append a finished (clean) block [B, K] to the cache: one more forward pass, σ = 0 and
        zero noise, as the clean half of training sees it; without the output head and the last
        block's attention output and MLP, which only the logits need."""
        batch, size = x_block.shape
        device = x_block.device
        noise = None if self.network.noise_proj is None else \
            torch.zeros(batch, size, self.network.config.noise_features, device=device)
        self.network(x_block, torch.zeros(batch, device=device), noise=noise, kv_cache=kv_cache, logits=False)
        kv_cache.commit()

    def _sigma(self, t: Tensor, batch: int, size: int, *, before: int = 0, after: int = 0) -> Tensor:
        """σ for [`before` clean, `size` noisy, `after` clean] tokens at time t [B] or per token
        [B, size] (constant inside each block, as block diffusion draws it: one t per (sequence,
        block); the first token's stands for its block); clean tokens get σ = 0.

        One σ per block, [B, blocks] (the network's σ per segment): its adaLN then runs once per
        block, not once per token (per token it costs ~8% of a 768-wide block's matmuls, and as
        much memory traffic as its output). [B] where one σ covers every token: no time
        conditioning (0 everywhere), or one noisy block alone."""
        if not self.time_conditioning:
            return torch.zeros(batch, device=t.device)
        sigma = self.sigma(t).float()
        if sigma.dim() == 1 and before == after == 0:
            return sigma
        K = self.block_size
        if size % K or before % K or after % K:  # not whole blocks (no caller of this package): per token
            noisy, K = (sigma[:, None].expand(batch, size) if sigma.dim() == 1 else sigma), 1
        else:
            noisy = sigma[:, ::K] if sigma.dim() == 2 else sigma[:, None].expand(batch, size // K)  # [B, size / K]
        return torch.cat([noisy.new_zeros(batch, before // K), noisy, noisy.new_zeros(batch, after // K)], dim=1)


@dataclass
class CausalDenoiser:
    """An autoregressive network fed [start, x_0, …]; `vocab_size` real tokens, start id = V."""

    network: DiT
    vocab_size: int

    def next_token_log_probs(self, inputs: Tensor) -> Tensor:
        """Log-probs over the real tokens [B, L, V]; σ is fed as 0."""
        sigma = torch.zeros(inputs.shape[0], device=inputs.device)
        logits = self.network(inputs, sigma)[..., : self.vocab_size]
        return torch.log_softmax(logits.float(), dim=-1)

    def __call__(self, inputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """`generator` is unused (no noise input): callable like `Denoiser`."""
        return self.next_token_log_probs(inputs)
