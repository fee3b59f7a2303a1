"""MDLM: the masked diffusion teacher (Sahoo et al. 2024).

Log-linear schedule (`noise=duo` is refused: Duo's α_t is the argmax marginal of a Gaussian over
the V token classes, a uniform-state quantity with α(0) < 1, not a masking rate), SUBS
parameterisation, continuous-time NELBO −log p_θ(x | z_t)/t on masked tokens, antithetic time
sampling, EMA, AdamW with warmup; k-step ancestral sampling through the shared sampler.
Config: `configs/algo/mdlm.yaml`. Run: `mdlm-dmmd algo=mdlm data=digits ...`.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from mdlm_dmmd.algos.base import AlgoBase, backbone_config, process_meta
from mdlm_dmmd.denoiser import Denoiser
from mdlm_dmmd.diffusion.masked import MaskedProcess, per_token as per_token_time
from mdlm_dmmd.diffusion.sampling import DiffusionSampler
from mdlm_dmmd.diffusion.schedules import build_schedule
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT


class MDLM(AlgoBase):
    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        if self.cfg.noise.get("type") == "duo":
            raise UserError("noise=duo is a uniform-state schedule (the argmax of a Gaussian over the V tokens) and "
                            "does not apply to the masked process of algo=mdlm; use noise=loglinear, or algo=udlm noise=duo")
        # The mask token is appended after the real vocabulary: V = vocab.size + 1.
        self.process = MaskedProcess(build_schedule(self.cfg.noise), mask_id=self.data_vocab_size)
        self.backbone = DiT(backbone_config(self.cfg, self.process.network_vocab(self.data_vocab_size)))
        self.time_conditioning = bool(self.cfg.algo.get("time_conditioning", False))
        self.init_ema(self.backbone)

    def loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        x = batch["input_ids"]  # [B, L]
        valid = batch.get("attention_mask", torch.ones_like(x)).to(torch.float32)
        t = self.data_times(x)
        z_t = self.process.corrupt(x, t, self.batch_share())
        # The NELBO counts masked tokens only, so the output head runs there only: no [B, L, V]
        # logits (at V = 50k, B·L = 32k tokens one such float32 tensor is 6.6 GB).
        masked = self.process.denoising_positions(z_t)
        log_p = self.denoiser(self.backbone)(z_t, t, at=masked)  # [N, V]
        per_token = torch.zeros_like(valid)
        rows = lambda u: u[masked][None]  # noqa: E731  [1, N]: the masked tokens as one row
        per_token[masked] = self.process.nelbo(log_p[None], rows(x), rows(z_t), rows(per_token_time(t, x)))[0]
        return (per_token * valid).sum(), valid.sum()

    def denoiser(self, network: torch.nn.Module) -> Denoiser:
        return Denoiser(network, self.process, self.time_conditioning)

    def sampler(self) -> DiffusionSampler:
        return DiffusionSampler(self.process)

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), **process_meta(self.process, self.time_conditioning)}

