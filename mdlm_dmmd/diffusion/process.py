"""The forward-process protocol: what algos, samplers and eval may ask of a diffusion process.

`MaskedProcess` and `UniformProcess` meet it; so can a third party's process, which then works
with the built-in samplers, pipeline and distillation parts unchanged. Code outside a process
asks its *capabilities* (the attributes below), never its `name`, which exists only to be
written into and read back from checkpoints (`meta()`, `diffusion.process_from_meta`).

Shapes: x and z are token ids [B, L] or, where "soft" is accepted, probability vectors
[B, L, V] over the network's V classes; times t, s are per sequence [B] or per token [B, L].
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Process(Protocol):
    # -- capabilities ---------------------------------------------------------------------------
    name: str  # serialisation only (checkpoint metadata)
    schedule: object  # α_t, α'_t, σ_t (`diffusion.schedules`)
    deterministic_prior: bool  # z_1 carries no randomness (all masks): a student needs a noise input
    posterior_linear_in_x: bool  # q(z_s | z_t, E[x]) = E[q(z_s | z_t, x)]: soft targets are valid
    has_elbo_weight: bool  # the NELBO is w(t) times a cross-entropy (`elbo_weight`)
    soft_corruption: bool  # `corrupt_soft` exists (a reparameterised soft z_t, e.g. Duo's latent)

    def meta(self) -> dict:
        """What a checkpoint records to rebuild the process."""

    def network_vocab(self, data_vocab: int) -> int:
        """Classes the network predicts for a data vocabulary (e.g. + 1 for a mask token)."""

    # -- forward process ------------------------------------------------------------------------
    def corrupt(self, x: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z_t ~ q(z_t | x) for token ids x. [B, L]"""

    def marginal_probs(self, x: Tensor, t: Tensor) -> Tensor:
        """q(z_t | x) for hard or soft x. [B, L, V] float64"""

    def corrupt_soft(self, x: Tensor, t: Tensor, generator: torch.Generator | None = None,
                     temperature: float = 1.0) -> Tensor:
        """A soft z_t [B, L, V], differentiable in x, whose argmax is distributed as q(z_t | x)
        (only where `soft_corruption`)."""

    def prior(self, shape: tuple[int, int], device: torch.device | str = "cpu", generator=None) -> Tensor:
        """z_1 [B, L]."""

    # -- posterior q(z_s | z_t, x), s < t -------------------------------------------------------
    def posterior_probs(self, z_t: Tensor, x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """q(z_s | z_t, x) for hard or soft x. [B, L, V] float64"""

    def sample_posterior(self, z_t: Tensor, x: Tensor, t: Tensor, s: Tensor, generator=None) -> Tensor:
        """z_s ~ q(z_s | z_t, x) for token ids x. [B, L]"""

    # Optional, outside the protocol: `sample_soft_posterior(z_t, x_probs, x, t, s, generator)`,
    # z_s ~ posterior_probs(z_t, x̂) given a draw x ~ x̂ per token, without building [B, L, V];
    # `sampling.step` uses it where a process has it (`UniformProcess`). Also optional: a keyword
    # `final=True` on the posterior methods, which `sampling.step` passes on a sampler's last step
    # where a method takes it, to end at the data (α_s = 1) when the schedule's α(0) is below 1.

    def draw_updated_positions(self, z_t: Tensor, t: Tensor, s: Tensor, generator=None) -> Tensor | None:
        """The positions z_s changes at, drawn before x is known [B, L] bool; None where every
        position depends on x (samplers then take the full path)."""

    def denoising_positions(self, z: Tensor) -> Tensor:
        """Positions whose clean value is still unknown in z (hard or soft). [B, L] bool"""

    # -- parameterisation and loss ----------------------------------------------------------------
    def log_probs(self, logits: Tensor, z_t: Tensor) -> Tensor:
        """x̂(z_t) as log-probs [B, L, V] from network logits; z_t hard or soft."""

    def elbo_weight(self, t: Tensor) -> Tensor:
        """w(t) of the continuous-time NELBO (only where `has_elbo_weight`)."""

    def nelbo(self, log_p: Tensor, x: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """Per-token continuous-time NELBO. [B, L]"""


MEMBERS = ("name", "schedule", "deterministic_prior", "posterior_linear_in_x", "has_elbo_weight",
           "soft_corruption", "meta", "network_vocab", "corrupt", "marginal_probs", "corrupt_soft", "prior",
           "posterior_probs", "sample_posterior", "draw_updated_positions", "denoising_positions",
           "log_probs", "elbo_weight", "nelbo")


def missing_members(process: object) -> list[str]:
    """The protocol's attributes and methods that `process` lacks (empty: it meets the protocol)."""
    return [name for name in MEMBERS if not hasattr(process, name)]


def as_probs(x: Tensor, num_classes: int) -> Tensor:
    """Token ids [B, L] as one-hot float64 [B, L, V]; probability vectors as float64."""
    if x.is_floating_point():
        return x.double()
    return torch.nn.functional.one_hot(x, num_classes).double()
