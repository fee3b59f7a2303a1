"""The uniform-state process of UDLM/Duo: q(z_t | x) = Cat(α_t x + (1 − α_t) π), π = 1/V.

A frozen value with the same method names as `MaskedProcess`, so the shared sampler, the
pipeline and the algos swap one for the other by config. There is no mask token: V is the data
vocabulary and every id is a real token, at every noise level. Times are per sequence [B] or per
token [B, L]; every method accepts both.

The posterior is D-MMD paper eq. (4) (= Sahoo et al. 2024; Appendix D eq. 23 repeats it with
typos: α_t for α_{t|s}, a missing z_t in the denominator). For a probability vector x̂ in place
of x, eq. (4) is Bayes' rule with x̂ as a *prior* over x,

    q(z_s | z_t, x̂) = q(z_t | z_s) Σ_x x̂(x) q(z_s | x) / Σ_x x̂(x) q(z_t | x),

which is not the mixture Σ_x x̂(x) q(z_s | z_t, x): unlike the masked process, eq. (4) is not
linear in x. The `ancestral` sampling rule uses the former, the `generator` rule (D-MMD
Algorithm 1: hard x ~ x̂, then z_s ~ q(z_s | z_t, x)) the latter. Duo's closed form
(`DUO_BASE._compute_posterior`) is eq. (4) multiplied out by V; the tests check both agree.

The NELBO is Duo's continuous-time `nll_per_token` (UDLM, Schiff et al. 2025), the dt → 0 limit
of KL(q(z_s | z_t, x) ‖ q(z_s | z_t, x̂)) / dt with s = t − dt (checked numerically in the tests).
Its minimiser is x̂ ∝ E_q[x | z_t] / q(z_t | x), not E_q[x | z_t] (paper Appendix D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mdlm_dmmd import rng

from mdlm_dmmd.diffusion.masked import per_token
from mdlm_dmmd.diffusion.process import as_probs
from mdlm_dmmd.diffusion.schedules import DuoSchedule, Schedule
from mdlm_dmmd.errors import UserError


@dataclass(frozen=True)
class UniformProcess:
    """Meets `diffusion.process.Process`."""

    schedule: Schedule
    vocab_size: int  # V: the number of classes; π = 1/V on every one of them
    name: str = "uniform"
    deterministic_prior: ClassVar[bool] = False  # z_1 ~ π is random already
    posterior_linear_in_x: ClassVar[bool] = False  # eq. (4) is Bayes' rule in x (module docstring)
    has_elbo_weight: ClassVar[bool] = False  # the NELBO is not w(t) times a cross-entropy

    def meta(self) -> dict:
        """What a checkpoint records to rebuild this process (`diffusion.process_from_meta`)."""
        return {"process": self.name, "vocab_size": self.vocab_size, **self.schedule.meta()}

    @property
    def soft_corruption(self) -> bool:
        """Duo's schedule is the argmax of a Gaussian latent, which `corrupt_soft` relaxes."""
        return isinstance(self.schedule, DuoSchedule)

    def network_vocab(self, data_vocab: int) -> int:
        """No mask token: the network predicts the data vocabulary."""
        return data_vocab

    def denoising_positions(self, z: Tensor) -> Tensor:
        """Tokens whose clean value is still unknown in z: all of them (any may be noise). [B, L]"""
        return torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)

    def elbo_weight(self, t: Tensor) -> Tensor:
        raise UserError("the uniform process has no scalar ELBO weight (has_elbo_weight is false): its NELBO "
                        "is not w(t) times a cross-entropy; use nelbo()")

    def _alphas(self, z_t: Tensor, t: Tensor, s: Tensor, final: bool = False) -> tuple[Tensor, Tensor]:
        """α_t and α_s per token, float64 (of float64 times: D-MMD's α_s/α_{s−ds} is within ~ds
        of 1), with a trailing class axis. Two [B, L, 1].

        `final` (the samplers' last step): α_s = 1, the data, whatever the schedule. Duo's α(0)
        is ≈ 0.93 at V = 50257 and Duo's sampler sets α_s = 1 on its last step, so that step
        returns x rather than a draw of q(z_0 | x) that re-noises ~7% of it. Losses keep the
        schedule's α(0): the posterior step from s to max(s − ds, 0) must stay a step of size ≤ s."""
        alpha_t = self.schedule.alpha(per_token(t, z_t).double())[..., None]
        alpha_s = torch.ones_like(alpha_t) if final else self.schedule.alpha(per_token(s, z_t).double())[..., None]
        return alpha_t, alpha_s

    # 1. forward process --------------------------------------------------------------------
    def corrupt(self, x: Tensor, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z_t ~ q(z_t | x): with probability 1 − α_t a token is redrawn uniformly (maybe as x)."""
        alpha_t = self.schedule.alpha(per_token(t, x))
        u = rng.rand(x.shape, generator, device=x.device, dtype=alpha_t.dtype)
        noise = rng.randint(0, self.vocab_size, x.shape, generator, device=x.device)
        return torch.where(u < alpha_t, x, noise)

    def marginal_probs(self, x: Tensor, t: Tensor) -> Tensor:
        """q(z_t | x) = α_t x + (1 − α_t)/V for hard or soft x. [B, L, V] float64"""
        alpha_t = self.schedule.alpha(per_token(t, x)).double()[..., None]
        return alpha_t * as_probs(x, self.vocab_size) + (1 - alpha_t) / self.vocab_size

    def corrupt_soft(self, x: Tensor, t: Tensor, generator: torch.Generator | None = None,
                     temperature: float = 1.0) -> Tensor:
        """Duo's reparameterised z_t: softmax((α̃_t x + σ̃_t ε) / τ), ε ~ N(0, I), for hard or
        soft x. [B, L, V] float32. Its argmax is distributed as q(z_t | x) for one-hot x (that is
        how `DuoSchedule` defines α_t); τ → 0 approaches that hard token.
        """
        if not self.soft_corruption:
            raise UserError(f"corrupt_soft needs the Gaussian latent of noise=duo; this process uses "
                            f"{self.schedule.describe()}")
        if temperature <= 0:
            raise UserError(f"corrupt_soft: temperature must be > 0, got {temperature}")
        x = as_probs(x, self.vocab_size).float()
        gamma = self.schedule.gamma(per_token(t, x).float())[..., None]  # [B, L, 1]
        noise = rng.randn(x.shape, generator, device=x.device, dtype=x.dtype)
        latent = torch.sigmoid(-gamma).sqrt() * x + torch.sigmoid(gamma).sqrt() * noise
        return torch.softmax(latent / temperature, dim=-1)

    def prior(
        self, shape: tuple[int, int], device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> Tensor:
        """z_1 ~ π: independent uniform tokens. (α_1 = ε > 0, so q(z_1 | x) is π only up to ε.)"""
        return torch.randint(0, self.vocab_size, shape, generator=generator, device=device)

    # 2. posterior q(z_s | z_t, x), s < t: eq. (4) --------------------------------------------
    def posterior_probs(self, z_t: Tensor, x_probs: Tensor, t: Tensor, s: Tensor, *, final: bool = False) -> Tensor:
        """q(z_s | z_t, x) of eq. (4) for x one-hot or a probability vector x̂. [B, L, V] float64.
        `final`: the samplers' last step, α_s = 1 (`_alphas`).

        With x̂ this is Bayes' rule under the prior x ~ x̂ (see the module docstring), which
        is what D-MMD's π_{s−ds}(x̂) of Appendix D means: call it with (z_s, x̂, s, s − ds).
        """
        alpha_t, alpha_s = self._alphas(z_t, t, s, final)
        alpha_ts = alpha_t / alpha_s  # α_{t|s}
        x = as_probs(x_probs, self.vocab_size)
        z_t_onehot = torch.nn.functional.one_hot(z_t, self.vocab_size).double()
        # 1. q(z_t | z_s) as a function of z_s: α_{t|s} [z_s = z_t] + (1 − α_{t|s}) π(z_t)
        forward_ts = alpha_ts * z_t_onehot + (1 - alpha_ts) / self.vocab_size
        # 2. q(z_s | x) = α_s x + (1 − α_s) π
        marginal_s = alpha_s * x + (1 - alpha_s) / self.vocab_size
        # 3. normaliser q(z_t | x) = α_t z_tᵀx + (1 − α_t) z_tᵀπ; rows then sum to 1 exactly
        #    because Σ_{z_s} q(z_t | z_s) q(z_s | x) = q(z_t | x) (α_{t|s} α_s = α_t)
        evidence = alpha_t * x.gather(-1, z_t[..., None]) + (1 - alpha_t) / self.vocab_size
        return forward_ts * marginal_s / evidence

    def sample_soft_posterior(self, z_t: Tensor, x_probs: Tensor, x: Tensor, t: Tensor, s: Tensor,
                              generator: torch.Generator | None = None, *, final: bool = False) -> Tensor:
        """z_s ~ `posterior_probs`(z_t, x̂) (the ancestral step) without building it, given x ~ x̂
        drawn per token. [B, L]

        For v ≠ z_t that posterior is linear in x̂: q(v) = a x̂_v + b, and at z_t it has e more:
            E = α_t x̂_{z_t} + (1 − α_t)/V,   a = (1 − α_{t|s}) α_s / (V E),
            b = (1 − α_{t|s})(1 − α_s) / (V² E),   e = α_{t|s} (α_s x̂_{z_t} + (1 − α_s)/V) / E,
        and a + V·b + e = 1. So: with prob e keep z_t, else with prob a take x (a draw from x̂),
        else a uniform token. One float64 uniform per token decides the branch. x̂ [B, L, V]
        (rows summing to 1) is only read at z_t: at V = 50258 this skips the five float64
        [B, L, V] tensors of `posterior_probs` (a uniform sampling step ~3x faster on a CPU)."""
        alpha_t, alpha_s = (a[..., 0] for a in self._alphas(z_t, t, s, final))  # [B, L]
        alpha_ts = alpha_t / alpha_s
        V = self.vocab_size
        at_z = x_probs.gather(-1, z_t[..., None])[..., 0].double()  # x̂_{z_t}
        evidence = alpha_t * at_z + (1 - alpha_t) / V
        p_keep = alpha_ts * (alpha_s * at_z + (1 - alpha_s) / V) / evidence
        p_data = (1 - alpha_ts) * alpha_s / V / evidence
        u = rng.rand(z_t.shape, generator, device=z_t.device, dtype=torch.float64)
        uniform = rng.randint(0, V, z_t.shape, generator, device=z_t.device)
        return torch.where(u < p_keep, z_t, torch.where(u < p_keep + p_data, x, uniform))

    def draw_updated_positions(self, z_t: Tensor, t: Tensor, s: Tensor, generator=None) -> None:
        """None: every token of z_s depends on x, so nothing can be drawn before it (cf. masked)."""
        return None

    def sample_posterior(
        self, z_t: Tensor, x: Tensor, t: Tensor, s: Tensor, generator: torch.Generator | None = None, *,
        final: bool = False,
    ) -> Tensor:
        """z_s ~ q(z_s | z_t, x) for a hard x [B, L], without building [B, L, V] (`final`: α_s = 1).

        For one-hot x, eq. (4) is a constant c on every class plus extra mass on z_t and on x:
            q(v) = c + p_keep [v = z_t] + p_data [v = x],  with N = α_t [x = z_t] + (1 − α_t)/V,
            c = (1 − α_{t|s})(1 − α_s)/V² / N,
            p_keep = α_{t|s} ((1 − α_s)/V + α_s [x = z_t]) / N,   p_data = (1 − α_{t|s}) α_s / V / N.
        So: with prob p_keep keep z_t, else with prob p_data take x, else a uniform token
        (V·c = 1 − p_keep − p_data). O(B·L) memory instead of float64 [B, L, V], which matters
        at V = 50258. One float64 uniform per token decides the branch.
        """
        alpha_t, alpha_s = (a[..., 0] for a in self._alphas(z_t, t, s, final))  # [B, L]
        alpha_ts = alpha_t / alpha_s
        V = self.vocab_size
        same = (x == z_t).double()
        evidence = alpha_t * same + (1 - alpha_t) / V
        p_keep = alpha_ts * ((1 - alpha_s) / V + alpha_s * same) / evidence
        p_data = (1 - alpha_ts) * alpha_s / V / evidence
        u = rng.rand(z_t.shape, generator, device=z_t.device, dtype=torch.float64)
        uniform = rng.randint(0, V, z_t.shape, generator, device=z_t.device)
        return torch.where(u < p_keep, z_t, torch.where(u < p_keep + p_data, x, uniform))

    # 3. parameterisation and loss -----------------------------------------------------------
    def log_probs(self, logits: Tensor, z_t: Tensor) -> Tensor:
        """Duo's "mean" parameterisation: log_softmax over all V classes. [B, L, V] float32.

        `z_t` (hard or soft) is unused: no carry-over, a token of z_t may be noise at any t.
        """
        del z_t
        return torch.log_softmax(logits.float(), dim=-1)

    def nelbo(self, log_p: Tensor, x: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """Per-token continuous-time NELBO of uniform-state diffusion (Duo `nll_per_token`). [B, L]

        With x̄_θ = V α_t x̂ + (1 − α_t) (V times q(z_t | ·) under the prior x̂), x̄ the same
        for the data one-hot, and c = (1 − α_t)/(V α_t + 1 − α_t) = x̄[z_t]/x̄[x] when x ≠ z_t:

            loss = α'_t/(V α_t) · (term1 − term2)
            term1 = V (1/x̄[z_t] − 1/x̄_θ[z_t])
            term2 = −(c [x = z_t] + [x ≠ z_t]) (Σ_v log x̄_θ[v] − V log x̄_θ[z_t])
                    − V α_t/(1 − α_t) (log x̄_θ[x] − log x̄_θ[z_t]) [x ≠ z_t]
                    + ((V − 1) c [x = z_t] − [x ≠ z_t]/c) log c

        Computed in the dtype of `log_p` (float32 in training, as Duo); needs 0 < α_t < 1.
        """
        V = self.vocab_size
        alpha_t = self.schedule.alpha(per_token(t, x)).to(log_p.dtype)  # [B, L]
        dalpha_t = self.schedule.dalpha(per_token(t, x)).to(log_p.dtype)
        same = (x == z_t).to(log_p.dtype)
        differ = 1 - same
        # 1. x̄ for the model (log) and the data, read at z_t and x
        log_xbar_theta = torch.log(V * alpha_t[..., None] * log_p.exp() + (1 - alpha_t[..., None]))  # [B, L, V]
        log_xbar_theta_zt = log_xbar_theta.gather(-1, z_t[..., None])[..., 0]
        log_xbar_theta_x = log_xbar_theta.gather(-1, x[..., None])[..., 0]
        xbar_zt = (1 - alpha_t) + V * alpha_t * same
        # 2. the two terms of Duo's expression
        term1 = V * (1 / xbar_zt - torch.exp(-log_xbar_theta_zt))
        c = (1 - alpha_t) / (V * alpha_t + 1 - alpha_t)
        term2 = (
            -(same * c + differ) * (log_xbar_theta.sum(-1) - V * log_xbar_theta_zt)
            - V * alpha_t / (1 - alpha_t) * (log_xbar_theta_x - log_xbar_theta_zt) * differ
            + ((V - 1) * c * same - differ / c) * torch.log(c)
        )
        return dalpha_t / (V * alpha_t) * (term1 - term2)

    def nelbo_soft(self, log_p: Tensor, x_probs: Tensor, z_t: Tensor, t: Tensor) -> Tensor:
        """`nelbo` with a probability vector x̂ [B, L, V] for the clean token (IDLM §3.2, form (b):
        x enters through x̄ = V q(z_t | x) = V α_t x + (1 − α_t), which is defined for soft x). [B, L]

            loss = α'_t/(V α_t) · (V/x̄[z_t] − V/x̄_θ[z_t]
                                   − Σ_v x̄_v/x̄[z_t] (log x̄_θ[z_t] − log x̄_θ[v] + log x̄_v − log x̄[z_t]))

        Equal to `nelbo` for one-hot x̂ (tested) and 0 when x̂_θ = x̂. Differentiable in x̂ and
        in log_p; z_t is the hard token (for Duo's soft input, its argmax).
        """
        V = self.vocab_size
        alpha_t = self.schedule.alpha(per_token(t, z_t)).to(log_p.dtype)[..., None]  # [B, L, 1]
        dalpha_t = self.schedule.dalpha(per_token(t, z_t)).to(log_p.dtype)
        xbar = V * alpha_t * x_probs.to(log_p.dtype) + (1 - alpha_t)
        log_xbar_theta = torch.log(V * alpha_t * log_p.exp() + (1 - alpha_t))
        at_z = z_t[..., None]
        xbar_z = xbar.gather(-1, at_z)
        log_xbar_theta_z = log_xbar_theta.gather(-1, at_z)
        term1 = V / xbar_z - V * torch.exp(-log_xbar_theta_z)
        term2 = (xbar / xbar_z * (log_xbar_theta_z - log_xbar_theta + torch.log(xbar) - torch.log(xbar_z))).sum(-1, True)
        return (dalpha_t[..., None] / (V * alpha_t) * (term1 - term2))[..., 0]

    def cross_entropy(self, log_p: Tensor, x: Tensor) -> Tensor:
        """−log x̂_θ(x | z_t) per token, unweighted (the `ce` teacher loss; D-MMD eq. 5, w = 1). [B, L]"""
        return -log_p.gather(-1, x[..., None])[..., 0]


def latent_input(latent: Tensor, temperature: float = 1.0) -> Tensor:
    """Duo's continuous input: a Gaussian latent over the vocabulary [B, L, V] as the soft token
    softmax(latent / τ) that the DiT embeds as probs @ W (Duo's `EmbeddingLayer` on 3-D input).

    τ is Duo's Gumbel-τ curriculum temperature; τ → 0 approaches the hard token argmax(latent).
    """
    if temperature <= 0:
        raise ValueError(f"latent_input: temperature must be > 0, got {temperature}")
    return torch.softmax(latent.float() / temperature, dim=-1)
