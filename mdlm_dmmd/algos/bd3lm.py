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

BD3-LM's clipped, variance-minimising schedule is an option: with `algo.clip_search_widths`
(e.g. [0.5, 0.6, 0.7, 0.8, 0.9]) every validation also computes the loss with t drawn in each
candidate interval, [sampling_eps, 1] and each [i, i + w] (i = 0, δ, 2δ, ... with δ =
`clip_search_delta`; i raised to `training.sampling_eps` where it is 0), collects the
per-(sequence, block) mean token losses of up to 100 batches, and training then draws t in the
interval whose losses vary least (the variances of each batch over every process's rows, summed
over batches, as BD3-LM's all-gather; buffers `sampling_eps_min/max`, saved in checkpoints;
`val/nll` stays the NELBO over [sampling_eps, 1]). Default off: t ∈ [sampling_eps, 1], as MDLM.

Other differences from the public code: the masking probability is 1 − α_t = (1 − ε)t of the
log-linear schedule (MDLM's; BD3-LM masks with probability t, the weight 1/t is the same);
with ignore_bos the first token also leaves the training loss's token count (BD3-LM drops it
from the count only in evaluation); BD3-LM's `training.resample` (re-drawing blocks whose masked
fraction falls outside the clipping interval) is not built; the sampler's entropy-based re-draw
is an option, off by default (`sampling.entropy_redraw`, `diffusion/block_sampling.py`).
Config: `configs/algo/bd3lm.yaml`. Run: `mdlm-dmmd algo=bd3lm block_size=4 model.length=16 ...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from mdlm_dmmd.algos.base import (AlgoBase, algo_section, backbone_config, build_settings,
                                  process_meta)
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
SEARCH_BATCHES = 100  # validation batches per candidate interval (BD3-LM)


def clip_intervals(widths, delta: float, eps: float) -> list[tuple[float, float]]:
    """BD3-LM's candidate intervals (its `valid_vars`): the full [eps, 1] first, so the search may
    keep the unclipped schedule, then [i, i + w], i = 0, δ, 2δ, ... ≤ 1 − w, per width w; a lower
    end below `eps` is raised to it (a 1/t weight at t = 0 is infinite). None without widths."""
    out = [(eps, 1.0)] if len(widths) else []
    for width in widths:
        for start in torch.arange(0, 1 - width + delta / 2, delta, dtype=torch.float64).tolist():
            low, high = max(round(start, 10), eps), min(round(start + width, 10), 1.0)
            if high > low and (low, high) not in out:
                out.append((low, high))
    return out


def spreads(batches: list[Tensor], gather=None) -> Tensor:
    """Per interval, the variance of the per-(sequence, block) losses within each validation
    batch, summed over batches; `batches`: one [n_intervals, rows] tensor per batch (its losses
    under each candidate interval). `gather` collects a tensor from every process ([W, ...]; each
    validates its own shard; BD3-LM's all-gather), so the variance is over the whole global
    batch and every process gets the same numbers; it is called once, on every batch at once
    (the batch index rides along as an extra row). [n_intervals] float64"""
    which = torch.cat([torch.full((b.shape[1],), i, dtype=torch.float64, device=b.device)
                       for i, b in enumerate(batches)])
    packed = torch.cat([which[None], torch.cat(batches, dim=1).double()])  # [1 + n_intervals, R]
    if gather is not None:  # [W, 1 + n_intervals, R] → every process's rows, process by process
        gathered = gather(packed)
        packed = gathered.permute(1, 0, 2).reshape(packed.shape[0], -1)
    which, losses = packed[0], packed[1:]
    totals = torch.zeros(losses.shape[0], dtype=torch.float64, device=losses.device)
    for i in range(len(batches)):
        rows = losses[:, which == i]
        if rows.shape[1] > 1:
            totals += rows.var(dim=1)
    return totals.cpu()


def lowest_variance(intervals: list[tuple[float, float]], batches: list[Tensor], gather=None) -> tuple[float, float]:
    """The interval whose per-(sequence, block) losses vary least (BD3-LM's
    `_clipped_schedule_search`); `batches` and `gather`: see `spreads`."""
    return intervals[int(torch.argmin(spreads(batches, gather)))]


@dataclass
class BD3LMConfig:
    """Mirror of configs/algo/bd3lm.yaml, validated once (every problem reported together)."""

    name: str = "bd3lm"
    process: str = "masked"
    time_conditioning: bool | None = None  # None: masked false (BD3-LM), uniform true (Duo)
    loss: str = "elbo"
    ignore_bos: bool | None = None  # None: true when the data has a BOS token
    clip_search_widths: tuple = ()  # BD3-LM's var_min search; empty: off
    clip_search_delta: float = 0.05

    @classmethod
    def from_mapping(cls, algo: Mapping[str, Any]) -> "BD3LMConfig":
        config = build_settings(cls, algo, "a bd3lm")
        problems = []
        if config.process not in PROCESSES:
            problems.append(f"algo.process must be one of {', '.join(PROCESSES)}, got {config.process!r}")
        for key in ("time_conditioning", "ignore_bos"):
            if getattr(config, key) is not None and not isinstance(getattr(config, key), bool):
                problems.append(f"algo.{key} must be true, false or null, got {getattr(config, key)!r}")
        widths = config.clip_search_widths
        if not isinstance(widths, (list, tuple)) or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w <= 1 for w in widths):
            problems.append(f"algo.clip_search_widths must be a list of numbers in (0, 1], got {widths!r}")
        delta = config.clip_search_delta
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
            problems.append(f"algo.clip_search_delta must be a number in (0, 1), got {delta!r}")
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
        if self.ignore_bos and bos is None:  # the sampler could not start a sequence with it
            raise UserError(f"algo.ignore_bos=true keeps position 0 as the data's BOS token, but data="
                            f"{self.cfg.data.get('name')} has none (vocab.bos_id); use algo.ignore_bos=null or false")
        eps = float(self.cfg.training.sampling_eps)
        # the interval training draws t from (BD3-LM's buffers; moved by the clipped-schedule search)
        self.register_buffer("sampling_eps_min", torch.tensor(eps, dtype=torch.float64))
        self.register_buffer("sampling_eps_max", torch.tensor(1.0, dtype=torch.float64))
        self.intervals = clip_intervals(self.settings.clip_search_widths, self.settings.clip_search_delta, eps)
        self.init_ema(self.backbone)

    @property
    def num_blocks(self) -> int:
        return self.length // self.block

    def block_times(self, x: Tensor, interval: tuple[float, float] | None = None) -> Tensor:
        """t per token [B, L], one per (sequence, block), antithetic over B · n_blocks, in
        `interval` (default: the training interval, [sampling_eps, 1] unless the search moved it)."""
        low, high = interval or (float(self.sampling_eps_min), float(self.sampling_eps_max))
        t = (high - low) * self.time_uniforms(x, self.num_blocks) + low  # = MDLM's (1 − eps) u + eps on [eps, 1]
        return block.per_token(t, self.block)  # constant inside a block

    def loss(self, batch: Mapping[str, Tensor], kind: str | None = None,
             interval: tuple[float, float] | None = None) -> tuple[Tensor, Tensor]:
        """(Σ per-token loss, token count); `kind` = elbo | ce, default `algo.loss`; t in `interval`."""
        total, count, _ = self.token_losses(batch, kind, interval)
        return total, count

    def token_losses(self, batch: Mapping[str, Tensor], kind: str | None = None,
                     interval: tuple[float, float] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`loss` and the per-token losses [B, L] (zero where not scored)."""
        x = batch["input_ids"]  # [B, L]
        valid = batch.get("attention_mask", torch.ones_like(x)).to(torch.float32)
        t = self.block_times(x, interval)
        z_t = self.process.corrupt(x, t, self.batch_share())
        if self.ignore_bos:  # BD3-LM: the BOS token is never noised, and carries no loss
            z_t[:, 0] = x[:, 0]
            valid[:, 0] = 0
        log_p = self.denoiser(self.backbone)(z_t, t, clean=x)  # [B, L, V]
        if (kind or self.settings.loss) == "elbo":
            per_token = self.process.nelbo(log_p, x, z_t, t)
        else:
            per_token = self.process.cross_entropy(log_p, x)
        per_token = per_token * valid
        return per_token.sum(), valid.sum(), per_token

    def validation_step(self, batch, batch_idx):
        # The NELBO over [sampling_eps, 1], also for `loss: ce` or a clipped schedule, so that
        # val/nll is a likelihood bound in every run.
        total, count = self.loss(batch, "elbo", (float(self.cfg.training.sampling_eps), 1.0))
        self._val_sum += total.double()
        self._val_count += count.double()
        if self.intervals and batch_idx < SEARCH_BATCHES:
            per_interval = []
            for interval in self.intervals:  # the training loss under each candidate interval
                _, _, per_token = self.token_losses(batch, None, interval)
                per_block = per_token.view(per_token.shape[0], -1, self.block).mean(-1)  # [B, n_blocks]
                per_interval.append(per_block.flatten().double())
            self._search.append(torch.stack(per_interval))  # [n_intervals, B · n_blocks]

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._search: list[Tensor] = []

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        if self._search:  # one collective for the whole search
            several = self.trainer.world_size > 1
            interval = lowest_variance(self.intervals, self._search, self.all_gather if several else None)
            self.sampling_eps_min.fill_(interval[0])
            self.sampling_eps_max.fill_(interval[1])
            self.log("train/sampling_eps_min", interval[0])
            self.log("train/sampling_eps_max", interval[1])

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
