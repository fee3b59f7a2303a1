"""Shared plumbing of teacher → few-step generator distillation (D-MMD now; IDLM/SDTT reuse it).

Three networks on one DiT class: a frozen teacher θ loaded from a checkpoint, a generator η and
an auxiliary model φ, both copied from the teacher (the generator optionally with a zero-init
noise input, so it equals the teacher at initialisation). Updates alternate between generator
and auxiliary with manual optimisation; `PhaseSchedule` says which network an optimiser update
belongs to, counted in updates (not micro-batches), so gradient accumulation never splits an
update across phases. Non-finite losses are skipped and counted (`NonFiniteGuard`).

Checkpoints hold generator, auxiliary, EMA and optimisers but not the teacher, which is
reloaded from `algo.teacher`; the generator is the network that `load_backbone` and sampling
see (`backbone_prefix = "generator."`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import torch
from torch import Tensor

from mdlm_dmmd.algos.base import AlgoBase, antithetic_times, process_meta
from mdlm_dmmd.checkpoints import LoadedBackbone, load_backbone, load_backbone_weights
from mdlm_dmmd.diffusion import MaskedProcess, UniformProcess, process_from_meta
from mdlm_dmmd.diffusion.schedules import build_schedule
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT
from mdlm_dmmd.pipeline import Pipeline

PHASES = ("gen", "aux")
Process = MaskedProcess | UniformProcess


@dataclass(frozen=True)
class PhaseSchedule:
    """Which network optimiser update i trains: `aux_per_gen` aux updates per generator update.

    first="gen" with aux_per_gen=1 is Algorithm 1's parity rule (i even → generator).
    """

    first: str = "gen"
    aux_per_gen: int = 1

    def phase(self, update: int) -> str:
        position = update % (self.aux_per_gen + 1)
        if self.first == "gen":
            return "gen" if position == 0 else "aux"
        return "gen" if position == self.aux_per_gen else "aux"


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class DistillationConfig:
    """The `algo.*` keys every distillation algo shares; subclasses add their own and extend
    `problems()`. Built from the composed `algo` node with `from_mapping`, validated once."""

    name: str = ""
    teacher: str | None = None
    first_step: str = "gen"
    aux_steps_per_gen_step: int = 1
    noise_input: bool | None = None  # None: on for masked teachers, off for uniform (paper §6.5)
    noise_dim: int = 64
    noise_pyramid: bool | None = None  # None: a 2D noise pyramid for image tokens, white noise for text (§6.5)
    lr_generator: float = 1e-5
    lr_aux: float = 1e-5
    lr_noise_input: float | None = None  # the generator's noise projection; None: lr_generator
    max_nonfinite_steps: int = 10
    student_dropout: float = 0.0  # generator and auxiliary; not from the paper (teacher and sampling use none)

    @classmethod
    def from_mapping(cls, algo: Mapping[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(algo) - known)
        if unknown:
            raise UserError(f"algo.{unknown[0]} is not a {algo.get('name', 'distillation')} key; accepted: {', '.join(sorted(known))}")
        config = cls(**dict(algo))
        problems = config.problems()
        if problems:
            raise UserError("; ".join(problems))
        return config

    def for_teacher(self, process: str, teacher_meta: dict):
        """A copy with teacher-dependent defaults filled in, checked against the teacher."""
        resolved = replace(self, noise_input=(process == "masked") if self.noise_input is None else self.noise_input)
        problems = resolved.teacher_problems(process, teacher_meta)
        if problems:
            raise UserError("; ".join(problems))
        return resolved

    def teacher_problems(self, process: str, teacher_meta: dict) -> list[str]:
        return []

    def problems(self) -> list[str]:
        found = []
        if self.first_step not in PHASES:
            found.append(f"algo.first_step must be gen or aux, got {self.first_step!r}")
        if not is_int(self.aux_steps_per_gen_step) or self.aux_steps_per_gen_step < 1:
            found.append(f"algo.aux_steps_per_gen_step must be an int >= 1, got {self.aux_steps_per_gen_step!r}")
        if self.noise_pyramid not in (None, True, False):
            found.append(f"algo.noise_pyramid must be true, false or null, got {self.noise_pyramid!r}")
        if self.noise_input is not False and (not is_int(self.noise_dim) or self.noise_dim < 1):
            found.append(f"algo.noise_dim must be an int >= 1 when algo.noise_input is true, got {self.noise_dim!r}")
        for key in ("lr_generator", "lr_aux"):
            if not getattr(self, key) > 0:
                found.append(f"algo.{key} must be > 0, got {getattr(self, key)}")
        if self.lr_noise_input is not None and not self.lr_noise_input > 0:
            found.append(f"algo.lr_noise_input must be > 0 or null (= lr_generator), got {self.lr_noise_input}")
        if isinstance(self.student_dropout, bool) or not isinstance(self.student_dropout, (int, float)) \
                or not 0 <= self.student_dropout < 1:
            found.append(f"algo.student_dropout must be a float in [0, 1), got {self.student_dropout!r}")
        if not is_int(self.max_nonfinite_steps) or self.max_nonfinite_steps < 1:
            found.append(f"algo.max_nonfinite_steps must be an int >= 1, got {self.max_nonfinite_steps!r}")
        return found


class NonFiniteGuard:
    """Counts consecutive non-finite losses; past `limit` in a row, training stops with a message."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def ok(self, loss: Tensor) -> bool:
        if torch.isfinite(loss).all():
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise UserError(
                f"loss was NaN/Inf for {self.in_a_row} steps in a row ({self.total} in total); "
                "lower optim.lr or algo.lr_*, or check the teacher (algo.max_nonfinite_steps sets the limit)"
            )
        return False


def load_teacher(path: str | None, *, data_vocab_size: int, length: int) -> tuple[LoadedBackbone, Process, bool]:
    """(frozen teacher, its process, time conditioning), checked against the data."""
    if not path:
        raise UserError("algo.teacher is required: a teacher checkpoint (.ckpt) or exported directory")
    teacher = load_backbone(path)
    if teacher.meta.get("process") == "autoregressive":
        raise UserError(f"algo.teacher {path} is an autoregressive model; distillation needs a diffusion teacher")
    process, time_conditioning = process_from_meta(teacher.meta, teacher.config.vocab_size, source=f"algo.teacher {path}")
    # masked: real tokens + the mask id; uniform: the real tokens only
    expected = data_vocab_size + 1 if process.name == "masked" else data_vocab_size
    if teacher.config.vocab_size != expected:
        raise UserError(
            f"algo.teacher vocab_size {teacher.config.vocab_size} does not match the data ({data_vocab_size} tokens"
            f"{' + mask' if process.name == 'masked' else ''} = {expected} for a {process.name} teacher); "
            "distil on the data the teacher was trained on"
        )
    if teacher.config.length != length:
        raise UserError(f"model.length ({length}) must equal the teacher's length ({teacher.config.length})")
    teacher.model.requires_grad_(False).eval()
    return teacher, process, time_conditioning


def copy_of(teacher: DiT, *, noise_dim: int = 0, noise_grid: list[int] | None = None,
            dropout: float = 0.0) -> DiT:
    """A trainable copy of the teacher; with noise_dim > 0 it gains a zero-init noise input
    (a pyramid over the token grid `noise_grid` = (H, W[, C]) when given). Dropout is 0 by
    default whatever the teacher's: the teacher and the sampled generator run without it, so a
    student trained with it would not equal the teacher at initialisation."""
    network = DiT(replace(teacher.config, noise_dim=noise_dim, noise_grid=noise_grid, dropout=dropout))
    load_backbone_weights(network, teacher.state_dict(), allow_missing_noise=True, source="teacher")
    return network.train()


class DistillationBase(AlgoBase):
    """Teacher/generator/aux setup, alternating manual optimisation, EMA on the generator."""

    backbone_prefix = "generator."
    not_in_checkpoint = ("teacher.",)

    def __init__(self, config: Mapping[str, Any], settings: DistillationConfig):
        super().__init__(config)
        self.automatic_optimization = False
        loaded, self.process, self.time_conditioning = load_teacher(
            settings.teacher, data_vocab_size=self.data_vocab_size, length=self.cfg.model.length
        )
        configured = build_schedule(self.cfg.noise, self.data_vocab_size)
        if configured != self.process.schedule:
            raise UserError(
                f"noise ({configured.describe()}) disagrees with the teacher's schedule "
                f"({self.process.schedule.describe()}); students use the teacher's schedule: "
                f"pass noise={self.process.schedule.name} with the teacher's parameters"
            )
        # Open choices that depend on the teacher (e.g. noise input on for masked, off for uniform).
        self.settings = settings = settings.for_teacher(self.process.name, loaded.meta)
        self.teacher_meta = loaded.meta
        self.teacher = loaded.model
        if settings.noise_input:
            self.generator = copy_of(self.teacher, noise_dim=settings.noise_dim, noise_grid=self.noise_grid(settings),
                                     dropout=settings.student_dropout)
        else:
            self.generator = copy_of(self.teacher, dropout=settings.student_dropout)
        self.aux = copy_of(self.teacher, dropout=settings.student_dropout)
        self.phases = PhaseSchedule(settings.first_step, settings.aux_steps_per_gen_step)
        self.guard = NonFiniteGuard(settings.max_nonfinite_steps)
        self.accumulate = int(self.cfg.trainer.get("accumulate_grad_batches", 1) or 1)
        self.micro_step = 0
        self.recent_gen_entropy: deque[float] = deque(maxlen=100)
        self.init_ema(self.generator)

    def noise_grid(self, settings: DistillationConfig) -> list[int] | None:
        """(H, W) of the data's token grid when the noise input is a pyramid (images), else None."""
        image_shape = self.cfg.vocab.get("image_shape")
        if settings.noise_pyramid is False or (settings.noise_pyramid is None and not image_shape):
            return None
        if not image_shape:
            raise UserError("algo.noise_pyramid=true needs image tokens (data with an image shape); "
                            "this data is text: use algo.noise_pyramid=false or null")
        return [int(n) for n in image_shape]

    # The generator is what base-class helpers (checkpoint meta, EMA, sampling) call "backbone".
    @property
    def backbone(self) -> DiT:
        return self.generator

    def ema_module(self) -> torch.nn.Module:
        return self.generator

    def train(self, mode: bool = True):
        """Lightning switches every submodule to train mode; the teacher stays in eval (no dropout)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def log_probs(self, network: DiT, z: Tensor, t: Tensor) -> Tensor:
        """x̂(z) of one of the three networks as SUBS log-probs [B, L, V] (fresh generator noise)."""
        return self.pipeline(network).log_probs(z, t)

    def pipeline(self, network: torch.nn.Module) -> Pipeline:
        # Students sample with the generator rule of Algorithm 1 (hard x, then the posterior).
        return Pipeline(network, self.process, self.time_conditioning, rule="generator")

    def data_time(self, x: Tensor) -> Tensor:
        training = self.cfg.training
        return antithetic_times(x.shape[0], training.sampling_eps, training.antithetic_sampling, x.device)

    # -- training: phases, accumulation, skipping -------------------------------------------
    def update_index(self) -> int:
        """Optimiser updates completed so far (each update is one network's step)."""
        return self.micro_step // self.accumulate

    def phase_loss(self, batch: Mapping[str, Tensor], phase: str) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss to minimise in `phase` ("gen" or "aux") and scalars to log."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        phase = self.phases.phase(self.update_index())
        optimizer = self.optimizers()[0 if phase == "gen" else 1]
        network = self.generator if phase == "gen" else self.aux
        loss, logs = self.phase_loss(batch, phase)
        if self.guard.ok(loss):
            self.manual_backward(loss / self.accumulate)
        self.micro_step += 1
        if self.micro_step % self.accumulate == 0:
            clip = self.cfg.trainer.get("gradient_clip_val")
            if clip:
                torch.nn.utils.clip_grad_norm_(network.parameters(), float(clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.lr_schedulers()[0 if phase == "gen" else 1].step()
            if phase == "gen" and self.ema is not None:
                self.ema.update(self.generator)
        if "gen_entropy" in logs:
            self.recent_gen_entropy.append(float(logs["gen_entropy"]))
        self.log(f"train/loss_{phase}", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        for key, value in logs.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False)
        self.log("train/nonfinite_steps", float(self.guard.total), on_step=True, on_epoch=False)

    def mean_gen_entropy(self) -> float:
        """Generator output entropy (paper Table 6) averaged over the last 100 training steps."""
        return sum(self.recent_gen_entropy) / max(len(self.recent_gen_entropy), 1)

    def generator_param_groups(self) -> list[dict]:
        """The generator's parameters, its noise projection (if any) in a group of its own rate.

        A zero-init projection of pure noise gets gradients of random sign, which Adam turns
        into steps of full size: its weights random-walk unless their rate is kept small.
        """
        noise = [p for n, p in self.generator.named_parameters() if n.startswith("noise_proj.")]
        rest = [p for n, p in self.generator.named_parameters() if not n.startswith("noise_proj.")]
        groups = [{"params": rest}]
        if noise:
            groups.append({"params": noise, "lr": self.settings.lr_noise_input or self.settings.lr_generator})
        return groups

    def configure_optimizers(self):
        gen = self.build_optimizer(self.generator_param_groups(), self.cfg.optim, lr=self.settings.lr_generator)
        aux = self.build_optimizer(self.aux.parameters(), self.cfg.optim, lr=self.settings.lr_aux)
        return [gen["optimizer"], aux["optimizer"]], [gen["lr_scheduler"]["scheduler"], aux["lr_scheduler"]["scheduler"]]

    # -- validation: the generator as a one-step denoiser (a drift diagnostic) --------------
    def loss(self, batch):
        x = batch["input_ids"]
        t = self.data_time(x)
        z_t = self.process.corrupt(x, t)
        per_token = self.process.nelbo(self.log_probs(self.generator, z_t, t), x, z_t, t)
        return per_token.sum(), torch.tensor(float(x.numel()), device=x.device)

    # -- checkpoints: the teacher is reloaded from algo.teacher, not stored -----------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(self.not_in_checkpoint)}
        checkpoint["distillation"] = {"micro_step": self.micro_step, "nonfinite_total": self.guard.total,
                                      "recent_gen_entropy": list(self.recent_gen_entropy)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
        state = checkpoint.get("distillation", {})
        self.micro_step = int(state.get("micro_step", 0))
        self.guard.total = int(state.get("nonfinite_total", 0))
        self.recent_gen_entropy.extend(state.get("recent_gen_entropy", []))

    def checkpoint_meta(self) -> dict:
        return {
            **super().checkpoint_meta(),
            **process_meta(self.process, self.time_conditioning),
            "sampling_rule": "generator",
            "teacher": str(self.settings.teacher),
        }
