"""BD3-LM: block diffusion (Arriola et al. 2025), masked as upstream and uniform as the D-MMD
paper's block-256 teacher (§6.3, Table 3).

A sequence of `model.length` tokens is cut into blocks of the top-level `block_size`. Training
draws one t per (sequence, block), antithetic over all B · n_blocks, corrupts each block with
its own α_t, and feeds the network [x_t, x_0] under BD3-LM's mask (`diffusion/block.py`,
`denoiser.BlockDenoiser`); the loss is each process's own per-token loss with per-token t:

- masked: SUBS and −log p_θ(x | z_t) / t on masked tokens (BD3-LM, log-linear; `elbo` only);
- uniform: the UDLM/Duo continuous-time NELBO (`loss: elbo`) or the CE of `algo=udlm loss=ce`.

Sampling: block by block with a KV cache of finished blocks (`diffusion/block_sampling.py`),
`sampling.steps` steps per block. `block_size == model.length` is plain diffusion: the same
loss as `mdlm` / `udlm` on the same batch and seed (the x_0 half is then wasted compute).

Differences from the public BD3-LM code, by choice: the clipped, variance-minimising schedule
(`var_min`, `clip_search_widths`) is not built yet (t ∈ [sampling_eps, 1] as in MDLM); the
sampler's first-hitting rule, entropy re-draws and sliding window are not built yet; and the
nucleus keeps the token that crosses p (this package's rule, BD3-LM drops it).
Config: `configs/algo/bd3lm.yaml`. Run: `mdlm-dmmd algo=bd3lm block_size=4 model.length=16 ...`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch import Tensor

from mdlm_dmmd.algos.base import AlgoBase, algo_section, backbone_config, process_meta
from mdlm_dmmd.denoiser import BlockDenoiser
from mdlm_dmmd.diffusion import block
from mdlm_dmmd.diffusion.block_sampling import BlockSampler
from mdlm_dmmd.diffusion.masked import MaskedProcess
from mdlm_dmmd.diffusion.schedules import build_schedule
from mdlm_dmmd.diffusion.uniform import UniformProcess
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT

PROCESSES = ("masked", "uniform")
LOSSES = ("elbo", "ce")


@dataclass
class BD3LMConfig:
    """Mirror of configs/algo/bd3lm.yaml, validated once (every problem reported together)."""

    name: str = "bd3lm"
    process: str = "masked"
    time_conditioning: bool | None = None  # None: masked false (BD3-LM), uniform true (Duo)
    loss: str = "elbo"
    ignore_bos: bool | None = None  # None: true when the data has a BOS token

    @classmethod
    def from_mapping(cls, algo: Mapping[str, Any]) -> "BD3LMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(algo) - known)
        if unknown:
            raise UserError(f"algo.{unknown[0]} is not a bd3lm key; accepted: {', '.join(sorted(known))}")
        config = cls(**dict(algo))
        problems = []
        if config.process not in PROCESSES:
            problems.append(f"algo.process must be one of {', '.join(PROCESSES)}, got {config.process!r}")
        for key in ("time_conditioning", "ignore_bos"):
            if getattr(config, key) is not None and not isinstance(getattr(config, key), bool):
                problems.append(f"algo.{key} must be true, false or null, got {getattr(config, key)!r}")
        if config.loss not in LOSSES:
            problems.append(f"algo.loss must be one of {', '.join(LOSSES)}, got {config.loss!r}")
        elif config.loss == "ce" and config.process == "masked":
            problems.append("algo.loss=ce is for algo.process=uniform; the masked process trains on its NELBO (elbo)")
        if problems:
            raise UserError("; ".join(problems))
        return config


class BD3LM(AlgoBase):
    block_diffusion = True

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.settings = BD3LMConfig.from_mapping(algo_section(config))
        self.block = self.block_size()
        uniform = self.settings.process == "uniform"
        if not uniform and self.cfg.noise.get("type") == "duo":
            raise UserError("noise=duo is a uniform-state schedule; use algo.process=uniform or noise=loglinear")
        if uniform:
            self.process = UniformProcess(build_schedule(self.cfg.noise, self.data_vocab_size),
                                          vocab_size=self.data_vocab_size)
        else:
            self.process = MaskedProcess(build_schedule(self.cfg.noise), mask_id=self.data_vocab_size)
        self.backbone = DiT(backbone_config(self.cfg, self.process.network_vocab(self.data_vocab_size)))
        tc = self.settings.time_conditioning
        self.time_conditioning = uniform if tc is None else tc
        bos = self.cfg.vocab.get("bos_id")
        self.ignore_bos = (bos is not None) if self.settings.ignore_bos is None else self.settings.ignore_bos
        self.init_ema(self.backbone)

    @property
    def num_blocks(self) -> int:
        return self.length // self.block

    def loss(self, batch: Mapping[str, Tensor], kind: str | None = None) -> tuple[Tensor, Tensor]:
        """(Σ per-token loss, token count); `kind` = elbo | ce, default `algo.loss`."""
        x = batch["input_ids"]  # [B, L]
        valid = batch.get("attention_mask", torch.ones_like(x)).to(torch.float32)
        t = self.data_times(x, self.num_blocks)  # [B] (one block) or [B, n_blocks]
        t = block.per_token(t.view(x.shape[0], -1), self.block)  # [B, L], constant inside a block
        z_t = self.process.corrupt(x, t)
        if self.ignore_bos:  # BD3-LM: the BOS token is never noised, and carries no loss
            z_t[:, 0] = x[:, 0]
            valid[:, 0] = 0
        log_p = self.denoiser(self.backbone)(z_t, t, clean=x)  # [B, L, V]
        if (kind or self.settings.loss) == "elbo":
            per_token = self.process.nelbo(log_p, x, z_t, t)
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
        """As `udlm`: a CE-trained uniform x̂ samples with the generator rule, else ancestral."""
        return "generator" if self.settings.loss == "ce" else "ancestral"

    def denoiser(self, network: torch.nn.Module) -> BlockDenoiser:
        return BlockDenoiser(network, self.process, self.time_conditioning, block_size=self.block)

    def sampler(self) -> BlockSampler:
        bos = self.cfg.vocab.get("bos_id") if self.ignore_bos else None
        return BlockSampler(self.process, self.block, self.sampling_rule, first_token=bos)

    def checkpoint_meta(self) -> dict:
        return {**super().checkpoint_meta(), **process_meta(self.process, self.time_conditioning),
                "block_size": self.block, "cross_attn": True, "ignore_bos": self.ignore_bos, "loss": self.settings.loss,
                "sampling_rule": self.sampling_rule}
