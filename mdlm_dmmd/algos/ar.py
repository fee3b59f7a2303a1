"""Autoregressive baseline on the same DiT with causal attention (Duo's `algo=ar`).

Used as the AR row of the results tables and, trained separately on a disjoint split and seed,
as a reference causal LM for the gradient-moment metric. The input is the sequence shifted right
behind a start token (id `vocab.size`, the slot masked models use for [MASK]), so position i
predicts x_i from x_<i and every position, the first included, is scored. σ is fed as 0.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from mdlm_dmmd.algos.base import AlgoBase, backbone_config
from mdlm_dmmd.denoiser import CausalDenoiser
from mdlm_dmmd.diffusion.sampling import AutoregressiveSampler, shift_right
from mdlm_dmmd.models.dit import DiT


class AR(AlgoBase):
    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.start_id = self.data_vocab_size
        self.backbone = DiT(backbone_config(self.cfg, self.data_vocab_size + 1, causal=True))
        self.init_ema(self.backbone)

    def loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        x = batch["input_ids"]  # [B, L]
        valid = batch.get("attention_mask", torch.ones_like(x)).to(torch.float32)
        log_p = self.denoiser(self.backbone)(shift_right(x, self.start_id))  # [B, L, V]
        nll = -log_p.gather(-1, x[..., None])[..., 0]  # [B, L]
        return (nll * valid).sum(), valid.sum()

    def denoiser(self, network: torch.nn.Module) -> CausalDenoiser:
        return CausalDenoiser(network, self.data_vocab_size)

    def sampler(self) -> AutoregressiveSampler:
        return AutoregressiveSampler(self.start_id)

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), "process": "autoregressive", "start_id": self.start_id}
