"""A denoiser: network + process + time conditioning + noise input + input layout, as one call.

Losses (training) and samplers (generation) call the same object, so a model is evaluated one
way only. `Denoiser(z_t, t)` gives x̂(z_t) as log-probs [B, L, V]; `CausalDenoiser(inputs)` the
next-token log-probs of an autoregressive network. Neither knows how its network was trained.

The input layout says what the network sees for z_t: `plain_layout` feeds z_t itself. Block
diffusion's [x_t, x_0] input with its block mask and repeated positions is another layout, a
function of the same signature, so losses and samplers do not change with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mdlm_dmmd.diffusion.process import Process
from mdlm_dmmd.models.dit import DiT

Layout = Callable[[DiT, Tensor, Tensor, "Tensor | None"], Tensor]  # (network, z, σ, noise) -> logits


def plain_layout(network: DiT, z: Tensor, sigma: Tensor, noise: Tensor | None) -> Tensor:
    """The network sees z_t (ids [B, L] or soft [B, L, V]) with full attention."""
    return network(z, sigma, noise=noise)


@dataclass
class Denoiser:
    network: DiT
    process: Process
    time_conditioning: bool = False
    layout: Layout = plain_layout

    def sigma(self, t: Tensor) -> Tensor:
        """The network's conditioning σ(t); zeros when it is not time-conditioned."""
        return self.process.schedule.sigma(t) if self.time_conditioning else torch.zeros_like(t)

    def log_probs(self, z_t: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x̂(z_t) as log-probs [B, L, V]; a noise-input network gets fresh noise on every call,
        so a noise-conditioned student can never be evaluated without its noise."""
        batch, length = z_t.shape[:2]
        noise = self.network.draw_noise(batch, length, generator=generator, device=z_t.device)
        return self.process.log_probs(self.layout(self.network, z_t, self.sigma(t), noise), z_t)

    def __call__(self, z_t: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.log_probs(z_t, t, generator)


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
