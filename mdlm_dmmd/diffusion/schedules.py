"""Noise schedules α(t): the fraction of clean signal kept at time t ∈ [0, 1].

Every process (masked, uniform, block) takes a schedule value; the network is conditioned on
σ(t) = −log α(t) (MDLM/Duo convention; MDLM and BD3-LM checkpoints feed σ = 0 instead, see
`time_conditioning` in the algo configs). A schedule's `meta()` (name and parameters) is stored
in checkpoints so that a model is never sampled or distilled with a schedule it was not trained
with (`schedule_from_meta` rebuilds it).

- `LogLinear`: α(t) = 1 − (1 − ε)t, any process.
- `DuoSchedule`: Duo's Gaussian-argmax schedule (Sahoo et al. 2025, "The Diffusion Duality"),
  uniform-state processes only, since α_t is defined through the V token classes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mdlm_dmmd.errors import UserError


def _describe(meta: dict) -> str:
    """"duo, vocab_size=17, gamma_min=-3.5, ...": the name, then the parameters."""
    return ", ".join([meta["schedule"], *(f"{k.removeprefix('schedule_')}={v}" for k, v in meta.items() if k != "schedule")])


@dataclass(frozen=True)
class LogLinear:
    """α(t) = 1 − (1 − ε)t (MDLM/Duo `LogLinear`); ε keeps α(1) > 0 so σ(1) is finite."""

    eps: float = 1e-3
    name: str = "loglinear"

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - (1 - self.eps) * t

    def dalpha(self, t: Tensor) -> Tensor:
        """dα/dt, a constant −(1 − ε)."""
        return torch.full_like(t, -(1 - self.eps))

    def sigma(self, t: Tensor) -> Tensor:
        """Total noise σ(t) = −log α(t), the network's conditioning input."""
        return -torch.log1p(-(1 - self.eps) * t)

    def meta(self) -> dict:
        """Checkpoint keys (the names older checkpoints already carry)."""
        return {"schedule": self.name, "schedule_eps": self.eps}

    def describe(self) -> str:
        return _describe(self.meta())


# -- Duo ---------------------------------------------------------------------------------------
_Z = torch.linspace(-10.0, 10.0, 2001, dtype=torch.float64)  # quadrature nodes; φ(±10) ≈ 8e-23
_LOG_PHI = -0.5 * _Z**2 - 0.5 * math.log(2 * math.pi)  # log φ(z)


def argmax_probability(gamma: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """p(γ) = P(argmax(α̃ e_x + σ̃ ε) = x) and dp/dγ, by quadrature. Two tensors shaped like γ, float64.

    α̃/σ̃ = sqrt(sigmoid(−γ)/sigmoid(γ)) = c = e^{−γ/2}. Token x wins when its coordinate c + z
    beats the V − 1 others, so with z the noise on x:

        p   = ∫ φ(z) Φ(z + c)^{V−1} dz
        dp/dc = ∫ z φ(z) Φ(z + c)^{V−1} dz      (differentiate ∫ φ(u − c) Φ(u)^{V−1} du in c)
        dp/dγ = −(c/2) dp/dc

    (Duo `utils._discrete_prob_map` / `_discrete_prob_grad`, which integrate the same with
    scipy's `quad` per γ). The power is taken in log space, (V − 1) log_ndtr(z + c), which
    stays accurate where Φ ≈ 1 at V = 50257; the trapezoid rule on 2001 nodes over [−10, 10]
    is exact to ~1e-12 here (smooth integrand vanishing at both ends).
    """
    gamma = torch.as_tensor(gamma, dtype=torch.float64).cpu()
    flat = gamma.reshape(-1)
    p, dp = torch.empty_like(flat), torch.empty_like(flat)
    dz = float(_Z[1] - _Z[0])
    for start in range(0, flat.numel(), 256):  # chunks bound the [n, 2001] temporaries
        c = torch.exp(-flat[start:start + 256] / 2)[:, None]  # [n, 1]
        integrand = torch.exp(_LOG_PHI + (vocab_size - 1) * torch.special.log_ndtr(_Z + c))  # [n, Z]
        p[start:start + 256] = torch.trapezoid(integrand, dx=dz, dim=-1)
        dp[start:start + 256] = -(c[:, 0] / 2) * torch.trapezoid(_Z * integrand, dx=dz, dim=-1)
    return p.reshape(gamma.shape), dp.reshape(gamma.shape)


@functools.lru_cache(maxsize=16)
def _integral_cache(vocab_size: int, gamma_min: float, gamma_max: float, num_points: int, device: str) -> Tensor:
    """Duo's "integral cache": p and dp/dγ on an even γ grid, float64 [2, num_points], per device.

    Built outside inference mode even when first asked for while sampling (`Pipeline.generate`
    runs under `torch.inference_mode`): the cached table must stay usable in training."""
    with torch.inference_mode(False):
        if device != "cpu":
            return _integral_cache(vocab_size, gamma_min, gamma_max, num_points, "cpu").to(device)
        gammas = torch.linspace(gamma_min, gamma_max, num_points, dtype=torch.float64)
        return torch.stack(argmax_probability(gammas, vocab_size))


@dataclass(frozen=True)
class DuoSchedule:
    """Duo's schedule: the argmax of a Gaussian latent on one-hot x, seen as a uniform-state process.

    The latent is α̃_t e_x + σ̃_t ε with γ_t = γ_min + t(γ_max − γ_min), α̃² = sigmoid(−γ),
    σ̃² = sigmoid(γ). Its argmax is a uniform-state process with
    α_t = (V p_t − 1)/(V − 1), p_t = P(argmax = x) (`argmax_probability`), so α ∈ (0, 1),
    decreasing in t; p → 1 as γ → −∞ and p → 1/V (α → 0) as γ → +∞.

    Numerics (our choice, as Duo's integral cache): p and dp/dγ are tabulated once per
    (V, γ_min, γ_max, num_points) on `num_points` even γ values, dp/dγ analytically under the
    integral, and read by linear interpolation (error ~5e-7 in α for 1001 points at V = 50257;
    exact evaluation costs 2001 nodes per token). dα/dt = V/(V − 1) · dp/dγ · (γ_max − γ_min)
    is interpolated from its own table, not differentiated from the interpolated α (both are
    within ~5e-6 of the exact values). Duo instead takes dα by a finite difference on its
    100 000-point table.

    Unlike `LogLinear`, α(0) < 1 (≈ 0.93 at V = 50257 with the defaults) and α(1) is not ≈ 0 for
    a small V (≈ 0.70 at V = 17): Duo's defaults are tuned for GPT-2/BERT vocabularies.
    Equality and hashing use the parameters only; the table is a derived cache.
    """

    vocab_size: int
    gamma_min: float = -3.5
    gamma_max: float = -1.75
    num_points: int = 1001
    name: str = "duo"

    def __post_init__(self):
        if not (self.vocab_size >= 2 and self.gamma_min < self.gamma_max and self.num_points >= 2):
            raise ValueError(f"DuoSchedule needs vocab_size >= 2, gamma_min < gamma_max, num_points >= 2; got {self}")

    def gamma(self, t: Tensor) -> Tensor:
        """γ_t = γ_min + t(γ_max − γ_min): log noise-to-signal ratio of the Gaussian latent."""
        return self.gamma_min + t * (self.gamma_max - self.gamma_min)

    def _lookup(self, row: int, t: Tensor) -> Tensor:
        """Row 0 (p) or 1 (dp/dγ) of the table at t ∈ [0, 1], linear interpolation. float64"""
        table = _integral_cache(self.vocab_size, self.gamma_min, self.gamma_max, self.num_points, str(t.device))[row]
        u = t.double().clamp(0, 1) * (self.num_points - 1)  # fractional index: the grid is even in t too
        i = u.floor().long().clamp(max=self.num_points - 2)
        w = u - i
        return table[i] * (1 - w) + table[i + 1] * w

    def _alpha64(self, t: Tensor) -> Tensor:
        V = self.vocab_size
        return (V * self._lookup(0, t) - 1) / (V - 1)

    def alpha(self, t: Tensor) -> Tensor:
        return self._alpha64(t).to(t.dtype)

    def dalpha(self, t: Tensor) -> Tensor:
        """dα/dt = V/(V − 1) · dp/dγ · dγ/dt (chain rule; dp/dγ from the table)."""
        V = self.vocab_size
        return (V / (V - 1) * self._lookup(1, t) * (self.gamma_max - self.gamma_min)).to(t.dtype)

    def sigma(self, t: Tensor) -> Tensor:
        """Total noise σ(t) = −log α(t), the network's conditioning input (as for LogLinear)."""
        return -torch.log(self._alpha64(t)).to(t.dtype)

    def meta(self) -> dict:
        return {"schedule": self.name, "schedule_vocab_size": self.vocab_size, "schedule_gamma_min": self.gamma_min,
                "schedule_gamma_max": self.gamma_max, "schedule_num_points": self.num_points}

    def describe(self) -> str:
        return _describe(self.meta())


Schedule = LogLinear | DuoSchedule
SCHEDULES = {"loglinear": LogLinear, "duo": DuoSchedule}


def build_schedule(cfg, vocab_size: int | None = None) -> Schedule:
    """Schedule from the Hydra `noise` node (`noise.type` and its keys, see configs/noise/).

    `vocab_size` is the V of a uniform-state process; Duo's schedule needs it and is refused
    without it (a masked process has no meaning for it).
    """
    kind = cfg.get("type", "loglinear")
    if kind not in SCHEDULES:
        raise UserError(f"noise.type '{kind}' is not supported; accepted: {', '.join(SCHEDULES)}")
    if kind == "loglinear":
        eps = float(cfg.get("eps", 1e-3))
        if not 0 <= eps < 1:
            raise UserError(f"noise.eps must be in [0, 1), got {eps}")
        return LogLinear(eps=eps)
    if vocab_size is None:
        raise UserError("noise=duo is a uniform-state schedule (the argmax of a Gaussian over the V tokens); "
                        "use it with a uniform-state algo such as algo=udlm, or use noise=loglinear")
    gamma_min = float(cfg.get("gamma_min", DuoSchedule.gamma_min))
    gamma_max = float(cfg.get("gamma_max", DuoSchedule.gamma_max))
    num_points = cfg.get("num_points", DuoSchedule.num_points)
    problems = []
    if not gamma_min < gamma_max:
        problems.append(f"noise.gamma_min ({gamma_min}) must be below noise.gamma_max ({gamma_max})")
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        problems.append(f"noise.num_points must be an int >= 2, got {num_points!r}")
    if problems:
        raise UserError("; ".join(problems))
    return DuoSchedule(vocab_size=int(vocab_size), gamma_min=gamma_min, gamma_max=gamma_max, num_points=num_points)


def schedule_from_meta(meta: dict, vocab_size: int, source: str = "checkpoint") -> Schedule:
    """The schedule a checkpoint recorded (`schedule.meta()` keys). Checkpoints from before Duo
    carry only "schedule": "loglinear" and maybe "schedule_eps"; no "schedule" means loglinear.
    `vocab_size` (the process's V) stands in when a Duo meta lacks its own."""
    kind = meta.get("schedule", "loglinear")
    if kind == "loglinear":
        return LogLinear(eps=float(meta.get("schedule_eps", 1e-3)))
    if kind == "duo":
        params = {key: meta[f"schedule_{key}"] for key in ("gamma_min", "gamma_max", "num_points")
                  if f"schedule_{key}" in meta}  # absent: the dataclass defaults
        return DuoSchedule(vocab_size=int(meta.get("schedule_vocab_size") or vocab_size), **params)
    raise UserError(f"{source}: schedule '{kind}' is not supported; accepted: {', '.join(SCHEDULES)}")
