"""SDTT: Self-Distillation Through Time (Deschenaux & Gulcehre 2025), re-implemented as the D-MMD
paper's baseline (Table 5).

A masked teacher and a student of the same architecture, the student initialised from the
teacher. Per batch: t ~ antithetic U[ε, 1], z_t ~ q(z_t | x); the frozen teacher takes two
ancestral steps of size dt from z_t (t → t − dt → t − 2dt); the target of a position masked in
z_t is the teacher's x̂ of the step that revealed it, or of the second step if neither did
(research/algorithms.md §1.3); the student, one forward on z_t, learns to match it, i.e. to take
one step of 2·dt. Loss on positions masked in z_t only, averaged over them:

- `kl_bwd` (default, as the official code): KL(student ‖ teacher); `kl_fwd`: KL(teacher ‖ student);
- `mse` / `tvd`: on probabilities with the mask column dropped (mean squared difference; half
  the L1 distance), or with `algo.official_forms` the official code's forms on log-probabilities
  (MSE over all V columns; L1 summed over them), to compare with its released students.

Rounds: round r's teacher takes `initial_steps / 2^r` steps (dt = 1 / that), its student is
trained for `initial_steps / 2^(r+1)`; every `algo.steps_per_round` optimiser steps the teacher
← the student (raw weights, or its EMA with `algo.teacher_from_ema`), dt doubles, and the
finished round's student is saved as `checkpoints/round{r}_k{k}.ckpt` (its metadata records k).
Training ends after the round whose student has `algo.final_steps` steps. The teacher, once
swapped, travels in checkpoints (`Teacher.save_to`), and the round is stored, so a resumed run
continues with the right teacher. `algo.official_grid` reproduces the official code's time grid
(its teacher steps start at t + (1 − t)(t − 2dt) and (1 − t)(t − 2dt); §1.3), for comparisons.
Config: `configs/algo/sdtt.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from mdlm_dmmd.algos.base import AlgoBase, algo_section, build_settings, process_meta
from mdlm_dmmd.algos.distillation import TEACHER_PREFIX, Teacher, copy_of, is_int
from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.denoiser import Denoiser
from mdlm_dmmd.diffusion.sampling import DiffusionSampler, step
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT

DIVERGENCES = ("kl_bwd", "kl_fwd", "mse", "tvd")


@dataclass
class SDTTConfig:
    """Mirror of configs/algo/sdtt.yaml, validated once (every problem reported together)."""

    name: str = "sdtt"
    teacher: str | None = None
    initial_steps: int = 1024
    final_steps: int = 8
    steps_per_round: int = 10000
    divergence: str = "kl_bwd"
    official_forms: bool = False
    official_grid: bool = False
    teacher_from_ema: bool = False

    @classmethod
    def from_mapping(cls, algo: Mapping[str, Any]) -> "SDTTConfig":
        config = build_settings(cls, algo, "an sdtt")
        problems = []
        for key in ("initial_steps", "final_steps", "steps_per_round"):
            value = getattr(config, key)
            if not is_int(value) or value < 1:
                problems.append(f"algo.{key} must be an int >= 1, got {value!r}")
        if not problems:
            ratio = config.initial_steps / config.final_steps
            if config.final_steps >= config.initial_steps:
                problems.append(f"algo.final_steps ({config.final_steps}) must be below algo.initial_steps "
                                f"({config.initial_steps}): each round halves the steps")
            elif ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
                problems.append(f"algo.initial_steps ({config.initial_steps}) must be algo.final_steps "
                                f"({config.final_steps}) times a power of two")
        if config.divergence not in DIVERGENCES:
            problems.append(f"algo.divergence must be one of {', '.join(DIVERGENCES)}, got {config.divergence!r}")
        for key in ("official_forms", "official_grid", "teacher_from_ema"):
            if not isinstance(getattr(config, key), bool):
                problems.append(f"algo.{key} must be true or false, got {getattr(config, key)!r}")
        if problems:
            raise UserError("; ".join(problems))
        return config

    @property
    def rounds(self) -> int:
        """Rounds until the student has `final_steps` steps: initial / 2^rounds = final."""
        return (self.initial_steps // self.final_steps).bit_length() - 1

    def teacher_steps(self, round_index: int) -> int:
        return self.initial_steps // 2 ** round_index

    def student_steps(self, round_index: int) -> int:
        return self.initial_steps // 2 ** (round_index + 1)


# -- targets and divergences: pure functions on tensors -----------------------------------------
def teacher_times(t: Tensor, dt: float, official: bool, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(start, end) of the teacher's two steps [B] each: t → t − dt → t − 2dt, or the official
    code's grid (start_i = t·space_i + (1 − t)(t − 2dt) for space = (1, 0), end_i = start_i − dt,
    starts clamped to ≥ ε). Ends below 0 reveal every remaining mask."""
    if not official:
        return t, t - dt, t - dt, t - 2 * dt
    end = t - 2 * dt
    first = (t + (1 - t) * end).clamp_min(eps)
    second = ((1 - t) * end).clamp_min(eps)
    return first, first - dt, second, second - dt


def divergence(student: Tensor, teacher: Tensor, kind: str, mask_id: int, official: bool = False) -> Tensor:
    """Per position [...] from log-probs [..., V] (student, teacher)."""
    if kind == "kl_bwd":
        return (student.exp() * (student - teacher)).sum(-1)
    if kind == "kl_fwd":
        return (teacher.exp() * (teacher - student)).sum(-1)
    if official:  # the official code's forms: on log-probs, every column (the mask's ≈ −1e6 included)
        return (student - teacher).pow(2).mean(-1) if kind == "mse" else (student - teacher).abs().sum(-1)
    keep = torch.ones(student.shape[-1], dtype=torch.bool, device=student.device)
    keep[mask_id] = False
    p, q = student.exp()[..., keep], teacher.exp()[..., keep]
    return (p - q).pow(2).mean(-1) if kind == "mse" else 0.5 * (p - q).abs().sum(-1)


class SDTT(AlgoBase):
    """Student (trained, EMA) and frozen teacher (a Teacher part, swapped every round)."""

    settings: SDTTConfig
    backbone_prefix = "student."  # what checkpoints expose to `load_backbone` and sampling
    not_in_checkpoint = (TEACHER_PREFIX,)  # reloaded from algo.teacher until the first swap

    @classmethod
    def settings_from(cls, config: Mapping[str, Any]) -> SDTTConfig:
        """The checked settings; also that `trainer.max_steps` lets the last round finish: a run
        that stopped earlier would end with a student of more steps than `algo.final_steps`
        (and a study would score it as the k it asked for)."""
        settings = SDTTConfig.from_mapping(algo_section(config))
        max_steps = (config.get("trainer") or {}).get("max_steps")
        needed = settings.rounds * settings.steps_per_round
        if settings.teacher is not None and is_int(max_steps) and 0 <= max_steps < needed:  # (no teacher: said first)
            raise UserError(f"algo=sdtt: {settings.rounds} rounds ({settings.initial_steps} -> {settings.final_steps} "
                            f"steps) of algo.steps_per_round={settings.steps_per_round} need trainer.max_steps >= "
                            f"{needed}, got {max_steps}: training would stop before the {settings.final_steps}-step "
                            "student is trained; raise trainer.max_steps or lower algo.steps_per_round")
        return settings

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.settings = self.settings_from(config)
        self.teacher_part = Teacher(self.settings.teacher, data_vocab_size=self.data_vocab_size,
                                    length=self.cfg.model.length)
        self.process, self.time_conditioning = self.teacher_part.process, self.teacher_part.time_conditioning
        if not self.process.deterministic_prior or not hasattr(self.process, "mask_id"):
            raise UserError(f"algo=sdtt distils masked teachers only; algo.teacher '{self.settings.teacher}' is a "
                            f"{self.teacher_part.meta.process or 'non-masked'} diffusion model")
        if self.teacher_part.block_size is not None:
            raise UserError("algo=sdtt takes plain (non-block) teachers; this teacher is a block-diffusion model")
        self.teacher = self.teacher_part.network
        self.student = copy_of(self.teacher, dropout=0.0)
        self.round = 0
        self.init_ema(self.student)

    @property
    def backbone(self) -> DiT:
        return self.student

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def denoiser(self, network: torch.nn.Module) -> Denoiser:
        return Denoiser(network, self.process, self.time_conditioning)

    def sampler(self) -> DiffusionSampler:
        return DiffusionSampler(self.process, "ancestral")

    def dt(self) -> float:
        """The teacher's step size this round: 1 / its number of steps."""
        return 1.0 / self.settings.teacher_steps(self.round)

    # -- the loss -------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_targets(self, z_t: Tensor, t: Tensor) -> Tensor:
        """Log-probs [B, L, V]: step 1's x̂ where step 1 revealed the token, else step 2's."""
        teacher = self.denoiser(self.teacher)
        t1, s1, t2, _ = teacher_times(t, self.dt(), self.settings.official_grid, float(self.cfg.training.sampling_eps))
        log_p1 = teacher(z_t, t1)
        # an end below 0 reveals every mask; the draws are each example's own on any number of processes
        z_1 = step(self.process, log_p1, z_t, t1, s1, generator=self.batch_share())
        revealed = (z_t == self.process.mask_id) & (z_1 != self.process.mask_id)
        log_p2 = teacher(z_1, t2.clamp_min(0))
        return torch.where(revealed[..., None], log_p1, log_p2)

    def loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(Σ divergence over positions masked in z_t, their number)."""
        x = batch["input_ids"]
        t = self.data_times(x)
        z_t = self.process.corrupt(x, t, self.batch_share())
        target = self.teacher_targets(z_t, t)
        student = self.denoiser(self.student)(z_t, t)
        masked = (z_t == self.process.mask_id).to(student.dtype)
        # both sides as SUBS leaves them (the mask column −1e6 − logsumexp): the official forms compare
        # every column, and a student equal to its target must cost 0 there too
        per_position = divergence(student, target, self.settings.divergence, self.process.mask_id,
                                  self.settings.official_forms)
        return (per_position * masked).sum(), masked.sum()

    # -- rounds ---------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        finished = self.trainer.global_step // self.settings.steps_per_round
        while self.round < finished:  # a round ended: save its student, swap, halve the steps
            self.end_round()
        if self.round >= self.settings.rounds:
            self.trainer.should_stop = True
            return None
        return super().training_step(batch, batch_idx)

    def on_train_end(self) -> None:
        # the last round is ended by the step after it, which training at exactly
        # rounds x steps_per_round updates never takes: its student's file is written here
        settings = self.settings
        if self.round == settings.rounds - 1 and self.trainer.global_step >= settings.rounds * settings.steps_per_round:
            self.save_round()

    def save_round(self) -> None:
        """`round{r}_k{k}.ckpt` beside the run's checkpoints: the student of the round that ended."""
        callback = getattr(self.trainer, "checkpoint_callback", None)
        if callback is not None and callback.dirpath:
            name = f"round{self.round}_k{self.settings.student_steps(self.round)}.ckpt"
            self.trainer.save_checkpoint(str(Path(callback.dirpath) / name))

    def end_round(self) -> None:
        """Save the finished round's student (`round{r}_k{k}.ckpt`), then teacher ← student."""
        self.save_round()
        if self.settings.teacher_from_ema and self.ema is not None:
            with self.ema.swapped_in(self.student):
                self.teacher_part.swap_from(self.student)
        else:
            self.teacher_part.swap_from(self.student)
        self.round += 1
        self.log("train/sdtt_round", float(self.round))

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        self.teacher_part.save_to(checkpoint)
        checkpoint["sdtt"] = {"round": self.round}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.teacher_part.restore_from(checkpoint)
        self.round = int(checkpoint.get("sdtt", {}).get("round", 0))

    def checkpoint_meta(self) -> dict:
        # the round's student steps travel with it, so a sweep samples each round's student at its
        # own k (after the last round, the student is the last round's)
        current = min(self.round, self.settings.rounds - 1)
        return {**super().checkpoint_meta(), **process_meta(self.process, self.time_conditioning),
                **self.teacher_part.provenance(), "sampling_steps": self.settings.student_steps(current),
                "sdtt_round": current}

    def validation_step(self, batch, batch_idx):
        # val/nll: the student's NELBO on held-out data (a drift diagnostic, as D-MMD's generator)
        x = batch["input_ids"]
        t = self.data_times(x)
        z_t = self.process.corrupt(x, t, self.batch_share())
        per_token = self.process.nelbo(self.denoiser(self.student)(z_t, t), x, z_t, t)
        self._val_sum += per_token.sum().double()
        self._val_count += float(x.numel())

    def check_resume_meta(self, recorded: CheckpointMeta, path: str) -> None:
        self.teacher_part.check_moved(recorded, f"checkpoint '{path}'")
