"""The masked (absorbing-state) process of MDLM: q(z_t | x) = Cat(α_t x + (1 − α_t) m).

A frozen value that algos and samplers hold, never a base class. Times are per sequence [B]
or per token [B, L] (block diffusion gives every block its own time); every method accepts
both. The mask token is the last id of the model vocabulary (`mask_id = V − 1`), as in the
public GPT-2 checkpoints (mask 50257, V = 50258).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mdlm_dmmd import rng

from mdlm_dmmd.diffusion.process import as_probs
from mdlm_dmmd.diffusion.schedules import Schedule
from mdlm_dmmd.errors import UserError

NEG_INF = -1e6  # SUBS "−∞" of MDLM: finite so that 0 · NEG_INF stays 0 in the losses


def per_token(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast a time [B] or [B, L] to the token grid [B, L] of `x`."""
    return t[:, None].expand(x.shape[:2]) if t.dim() == 1 else t


@dataclass(frozen=True)
class MaskedProcess:
    """Meets `diffusion.process.Process`; the mask is the last of the network's classes."""

    schedule: Schedule
    mask_id: int
    name: str = "masked"
    deterministic_prior: ClassVar[bool] = True  # z_1 is all masks
    posterior_linear_in_x: ClassVar[bool] = True
    has_elbo_weight: ClassVar[bool] = True
    soft_corruption: ClassVar[bool] = False

    def meta(self) -> dict:
        """What a checkpoint records to rebuild this process (`diffusion.process_from_meta`)."""
        return {"process": self.name, "mask_id": self.mask_id, **self.schedule.meta()}

    @property
    def num_classes(self) -> int:
        return self.mask_id + 1

    def network_vocab(self, data_vocab: int) -> int:
        """The real tokens and the mask."""
        return data_vocab + 1

    def denoising_positions(self, z: Tensor) -> Tensor:
        """Tokens whose clean value is still unknown in z: the masked ones (soft z: any mask mass). [B, L] bool"""
        if z.is_floating_point():
            return z[..., self.mask_id] > 0
        return z == self.mask_id

    # 1. forward process --------------------------------------------------------------------
    def corrupt(self, x: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z_t ~ q(z_t | x): each token is masked independently with probability 1 − α_t."""
        alpha_t = self.schedule.alpha(per_token(t, x))
        u = rng.rand(x.shape, generator, device=x.device, dtype=alpha_t.dtype)
        return torch.where(u < alpha_t, x, self.mask_id)

    def marginal_probs(self, x: Tensor, t: Tensor) -> Tensor:
        """q(z_t | x) = α_t x + (1 − α_t) m for hard or soft x. [B, L, V] float64"""
        alpha_t = self.schedule.alpha(per_token(t, x)).double()[..., None]
        probs = alpha_t * as_probs(x, self.num_classes)
        probs[..., self.mask_id] += 1 - alpha_t[..., 0]
        return probs

    def corrupt_soft(self, x: Tensor, t: Tensor, generator=None, temperature: float = 1.0) -> Tensor:
        raise UserError("the masked process has no reparameterised soft corruption (soft_corruption is false): "
                        "masking is a discrete choice; use corrupt() or a uniform process with noise=duo")

    def prior(self, shape: tuple[int, int], device: torch.device | str = "cpu", generator=None) -> Tensor:
        """z_1: every token masked (deterministic: `generator` is unused)."""
        return torch.full(shape, self.mask_id, dtype=torch.long, device=device)

    # 2. posterior q(z_s | z_t, x), s < t --------------------------------------------------
    def reveal_probability(self, z_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """(α_s − α_t) / (1 − α_t): chance that a masked token is revealed between t and s. [B, L]"""
        alpha_t = self.schedule.alpha(per_token(t, z_t)).double()
        alpha_s = self.schedule.alpha(per_token(s, z_t)).double()
        return ((alpha_s - alpha_t) / (1 - alpha_t).clamp_min(1e-12)).clamp(0, 1)

    def posterior_probs(self, z_t: Tensor, x_probs: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """q(z_s | z_t, x) for token ids x or a probability vector (linear in x). [B, L, V] float64.

        Masked rows: reveal · x, with the rest of the mass on the mask. Clean rows: one-hot
        of z_t (carry-over). `x_probs` must put no mass on the mask id (SUBS guarantees it).
        """
        reveal = self.reveal_probability(z_t, t, s)[..., None]  # [B, L, 1]
        x_probs = as_probs(x_probs, self.num_classes)
        probs = reveal * x_probs
        probs[..., self.mask_id] = 1 - reveal[..., 0]
        clean = z_t != self.mask_id
        carry = torch.nn.functional.one_hot(z_t, x_probs.shape[-1]).double()
        return torch.where(clean[..., None], carry, probs)

    def draw_updated_positions(
        self, z_t: Tensor, t: Tensor, s: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """The masked tokens of z_t that z_s reveals, drawn before x is known. [B, L] bool

        Whether a token is revealed between t and s does not depend on x, so a sampler can draw
        this first and sample x only where it is revealed: per step that is ~L/k rows of
        float64 work instead of L (`sampling.sample`).
        """
        reveal = self.reveal_probability(z_t, t, s)
        u = rng.rand(z_t.shape, generator, device=z_t.device, dtype=torch.float64)
        return (z_t == self.mask_id) & (u < reveal)

    def sample_posterior(
        self, z_t: Tensor, x: Tensor, t: Tensor, s: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """z_s ~ q(z_s | z_t, x) for a hard x [B, L]: masked tokens become x_i w.p. reveal."""
        return torch.where(self.draw_updated_positions(z_t, t, s, generator), x, z_t)

    # 3. parameterisation and loss -----------------------------------------------------------
    def log_probs(self, logits: Tensor, z_t: Tensor, *, overwrite: bool = False) -> Tensor:
        """SUBS (MDLM): never predict the mask; revealed tokens are copied. [B, L, V] log-probs.

        A soft z_t [B, L, V] (IDLM) gives the mixture z_t[mask] · x̂ + (z_t without its mask
        mass), differentiable in z_t; for one-hot z_t it equals the hard case up to NEG_INF.
        `overwrite`: the caller gives up `logits` (a network's fresh output, `Denoiser`); without
        gradient through them, the mask's logit is then set in place, not in a [.., V] copy.
        """
        if not overwrite or logits.requires_grad:
            logits = logits.clone()
        logits[..., self.mask_id] = NEG_INF
        log_p = torch.log_softmax(logits, dim=-1)
        if z_t.is_floating_point():
            masked_mass = z_t[..., self.mask_id, None].to(log_p.dtype)  # [B, L, 1]
            kept = z_t.to(log_p.dtype).index_fill(-1, torch.tensor([self.mask_id], device=z_t.device), 0.0)
            return torch.log((masked_mass * log_p.exp() + kept).clamp_min(1e-30)).clamp_min(NEG_INF)
        clean = (z_t != self.mask_id)[..., None]
        # rows gathered at masked tokens (samplers, gathered losses): nothing to carry (one host
        # sync on a GPU, as the boolean gathers of those callers already make)
        if not clean.any():
            return log_p
        carry = torch.full_like(log_p, NEG_INF).scatter_(-1, z_t[..., None], 0.0)
        return torch.where(clean, carry, log_p)

    def elbo_weight(self, t: Tensor) -> Tensor:
        """−α'_t / (1 − α_t) (= 1/t for log-linear): the continuous-time NELBO weight."""
        return -self.schedule.dalpha(t) / (1 - self.schedule.alpha(t))

    def nelbo(self, log_p: Tensor, x: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """Per-token continuous-time NELBO: w(t) · −log p_θ(x | z_t) on masked tokens. [B, L]"""
        nll = -log_p.gather(-1, x[..., None])[..., 0]
        weight = self.elbo_weight(per_token(t, x))
        return torch.where(z_t == self.mask_id, weight * nll, torch.zeros_like(nll))

    def nelbo_soft(self, log_p: Tensor, x_probs: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """`nelbo` with a probability vector x̂ [B, L, V] for the clean token (IDLM's relaxation,
        §3.2): w(t) · −Σ_c x̂_c log p_θ,c on tokens masked in the hard z_t, 0 elsewhere. [B, L]

        Linear in x̂; equals `nelbo` for one-hot x̂. The mask column never carries x̂ mass (SUBS),
        so its NEG_INF log-prob contributes 0.
        """
        cross_entropy = -(x_probs.to(log_p.dtype) * log_p).sum(-1)
        weight = self.elbo_weight(per_token(t, z_t)).to(log_p.dtype)
        return torch.where(z_t == self.mask_id, weight * cross_entropy, torch.zeros_like(cross_entropy))
