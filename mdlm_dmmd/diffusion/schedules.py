"""Noise schedules α(t): the fraction of clean signal kept at time t ∈ [0, 1].

Every process (masked, uniform, block) takes a schedule value; the network is conditioned on
σ(t) = −log α(t) (MDLM/Duo convention; MDLM and BD3-LM checkpoints feed σ = 0 instead, see
`time_conditioning` in the algo configs). The schedule name is stored in checkpoints so that a
model is never sampled with a schedule it was not trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mdlm_dmmd.errors import UserError


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


SCHEDULES = {"loglinear": LogLinear}


def build_schedule(cfg) -> LogLinear:
    """Schedule from the Hydra `noise` node (`noise.type`, `noise.eps`)."""
    kind = cfg.get("type", "loglinear")
    if kind not in SCHEDULES:
        raise UserError(f"noise.type '{kind}' is not supported; accepted: {', '.join(SCHEDULES)}")
    eps = float(cfg.get("eps", 1e-3))
    if not 0 <= eps < 1:
        raise UserError(f"noise.eps must be in [0, 1), got {eps}")
    return SCHEDULES[kind](eps=eps)
