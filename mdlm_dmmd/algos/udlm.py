"""UDLM: the uniform-state diffusion teacher (Schiff et al. 2025; Duo's `DUO_BASE`, Sahoo et al. 2025).

Log-linear schedule (or Duo's Gaussian-argmax schedule with `noise=duo`; the discrete process only,
not Duo's Gaussian curriculum), uniform noise over the V data tokens (no mask slot), Duo's "mean"
parameterisation (a plain softmax over V), the DiT conditioned on σ(t) = −log α_t, antithetic
time sampling, EMA, AdamW with warmup; k-step sampling through the shared sampler with the
posterior of D-MMD paper eq. (4). Config: `configs/algo/udlm.yaml`.
Run: `mdlm-dmmd algo=udlm data=digits model.length=64`.

Open choice (a config key): the training loss.
- `elbo` (default): Duo's continuous-time uniform NELBO. Its minimiser is x̂ ∝ E_q[x | z_t] /
  q(z_t | x), not E_q[x | z_t] (D-MMD paper, Appendix D), so a D-MMD student of this teacher
  should use the posterior-space losses of Appendix D (eqs. 24–26).
- `ce`: −log x̂_θ(x | z_t) with the ELBO weight removed (paper eq. 5, w = 1). Its minimiser is
  E_q[x | z_t], the quantity the x0-space D-MMD losses (eqs. 11–12) match. Not a likelihood bound.
Validation always reports the NELBO (`val/nll`), whatever the training loss, so runs compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from mdlm_dmmd.algos.base import AlgoBase, algo_section, backbone_config, build_settings, process_meta
from mdlm_dmmd.denoiser import Denoiser
from mdlm_dmmd.diffusion.sampling import DiffusionSampler
from mdlm_dmmd.diffusion.schedules import build_schedule
from mdlm_dmmd.diffusion.uniform import UniformProcess
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT

LOSSES = ("elbo", "ce")


@dataclass
class UDLMConfig:
    """Mirror of configs/algo/udlm.yaml, validated once (every problem reported together)."""

    name: str = "udlm"
    time_conditioning: bool = True
    loss: str = "elbo"

    @classmethod
    def from_mapping(cls, algo: Mapping[str, Any]) -> "UDLMConfig":
        config = build_settings(cls, algo, "a udlm")
        problems = []
        if not isinstance(config.time_conditioning, bool):
            problems.append(f"algo.time_conditioning must be true or false, got {config.time_conditioning!r}")
        if config.loss not in LOSSES:
            problems.append(f"algo.loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
        if problems:
            raise UserError("; ".join(problems))
        return config


class UDLM(AlgoBase):
    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.settings = UDLMConfig.from_mapping(algo_section(config))
        # No mask token: the model vocabulary is the data vocabulary, V = vocab.size.
        self.process = UniformProcess(build_schedule(self.cfg.noise, self.data_vocab_size), vocab_size=self.data_vocab_size)
        self.backbone = DiT(backbone_config(self.cfg, self.process.network_vocab(self.data_vocab_size)))
        self.time_conditioning = self.settings.time_conditioning
        self.init_ema(self.backbone)

    def loss(self, batch: Mapping[str, Tensor], kind: str | None = None) -> tuple[Tensor, Tensor]:
        """(Σ per-token loss, token count); `kind` = elbo | ce, default `algo.loss`."""
        x = batch["input_ids"]  # [B, L]
        valid = batch.get("attention_mask", torch.ones_like(x)).to(torch.float32)
        t = self.data_times(x)
        z_t = self.process.corrupt(x, t, self.batch_share())
        log_p = self.denoiser(self.backbone)(z_t, t)  # [B, L, V]
        if (kind or self.settings.loss) == "elbo":
            per_token = self.process.nelbo(log_p, x, z_t, t)  # [B, L]
        else:
            per_token = self.process.cross_entropy(log_p, x)
        return (per_token * valid).sum(), valid.sum()

    def validation_step(self, batch, batch_idx):
        # The NELBO, also for `loss: ce`, so that val/nll is a likelihood bound in every run.
        total, count = self.loss(batch, "elbo")
        self._val_sum += total.double()
        self._val_count += count.double()

    @property
    def sampling_rule(self) -> str:
        """A CE-trained x̂ is E[x | z_t], so its reverse step is the mixture Σ_x x̂(x) q(z_s | z_t, x)
        (the generator rule); an ELBO-trained one keeps Duo's plug-in posterior (ancestral)."""
        return "generator" if self.settings.loss == "ce" else "ancestral"

    def denoiser(self, network: torch.nn.Module) -> Denoiser:
        return Denoiser(network, self.process, self.time_conditioning)

    def sampler(self) -> DiffusionSampler:
        return DiffusionSampler(self.process, self.sampling_rule)

    def checkpoint_meta(self) -> dict:
        # `loss` tells a distiller whether x̂ targets E[x | z_t] (ce) or the ELBO optimum (elbo).
        return {**super().checkpoint_meta(), **process_meta(self.process, self.time_conditioning),
                "loss": self.settings.loss, "sampling_rule": self.sampling_rule}
