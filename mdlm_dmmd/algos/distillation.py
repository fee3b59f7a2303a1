"""Parts of teacher → few-step generator distillation, held by algos (D-MMD now; SDTT, IDLM next).

Composition, not a base class (DESIGN principle 6): an algo holds the parts it needs.

- `DistillationConfig`: the `algo.*` keys every distillation algo shares, validated once.
- `Teacher`: loads a frozen teacher, checks it against the data, records where it came from
  (resolved path and content hash); `swap_from(student)` replaces its weights (SDTT's rounds),
  after which the teacher must travel in the checkpoint (`in_checkpoint`).
- `Alternation`: manual optimisation of networks in turns. `PhaseSchedule` says which network
  an optimiser update belongs to, counted in updates (not micro-batches), so gradient
  accumulation never splits an update across phases; an update with a non-finite loss or
  gradient is skipped and counted (`NonFiniteGuard`); clipping, the optimiser and scheduler
  steps and the EMA step happen on an update's last micro-batch. Under DDP it averages the
  updated network's gradients itself, once per update (`average_gradients`; DDP's own hooks
  would expect every parameter of the module in every backward, but each update trains one
  network), so every rank takes the same step and makes the same skip decision. Under FSDP the
  gradients come averaged (and sharded) from the backward; the norm is taken over all shards.
- `copy_of`, `noise_grid`, `generator_param_groups`: building students from the teacher.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from mdlm_dmmd import ranks
from mdlm_dmmd.algos.base import build_settings
from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.checkpoints import LoadedBackbone, load_backbone, load_backbone_weights
from mdlm_dmmd.diffusion import Process, process_from_meta
from mdlm_dmmd.diffusion.schedules import build_schedule
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.files import is_temporary
from mdlm_dmmd.models.dit import DiT
from mdlm_dmmd.models.shards import full, is_sharded

PHASES = ("gen", "aux")
TEACHER_PREFIX = "teacher."  # where an algo holding a Teacher keeps its network in the state_dict


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
    noise_input: bool | None = None  # None: on where the prior is deterministic (masked), off for uniform (§6.5)
    noise_dim: int = 64
    noise_pyramid: bool | None = None  # None: a 2D noise pyramid for image tokens, white noise for text (§6.5)
    lr_generator: float = 1e-5
    lr_aux: float = 3e-5  # configs/algo/dmmd.yaml
    lr_noise_input: float | None = None  # the generator's noise projection; None: lr_generator
    max_nonfinite_steps: int = 10
    student_dropout: float = 0.0  # generator and auxiliary; not from the paper (teacher and sampling use none)

    @classmethod
    def from_mapping(cls, algo: Mapping[str, Any]):
        config = build_settings(cls, algo, f"a {algo.get('name', 'distillation')}")
        problems = config.problems()
        if problems:
            raise UserError("; ".join(problems))
        return config

    def for_teacher(self, process: Process, teacher_meta: CheckpointMeta):
        """A copy with teacher-dependent defaults filled in, checked against the teacher's
        process (by its capabilities) and metadata. A generator started from a deterministic
        prior (all masks) needs a noise input to be anything but deterministic (paper §6.5)."""
        noise_input = process.deterministic_prior if self.noise_input is None else self.noise_input
        resolved = replace(self, noise_input=noise_input)
        problems = resolved.teacher_problems(process, teacher_meta)
        if problems:
            raise UserError("; ".join(problems))
        return resolved

    def teacher_problems(self, process: Process, teacher_meta: CheckpointMeta) -> list[str]:
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
    """Counts consecutive non-finite updates (a loss or the gradient); past `limit` in a row,
    training stops with a message.

    `ok(value)` decides on the host (one sync). `record(bad)` counts on the device instead and
    looks at the counts on the host only every `check_every` records (`check`), so a GPU step
    never waits for it; the stop then comes up to `check_every` updates late."""

    def __init__(self, limit: int, check_every: int = 50):
        self.limit = limit
        self.check_every = max(1, int(check_every))
        self.in_a_row = 0
        self.total = 0
        self._device: tuple[Tensor, Tensor] | None = None  # (in a row, total) not yet checked
        self._pending = 0

    def ok(self, loss: Tensor) -> bool:
        if torch.isfinite(loss).all():
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        self._stop_if_over()
        return False

    def record(self, bad: Tensor) -> None:
        """Count one update on the device: `bad` is a bool scalar tensor."""
        bad = bad.to(torch.int64)
        in_a_row, total = self._device or (bad.new_tensor(self.in_a_row), bad.new_tensor(0))
        self._device = ((in_a_row + bad) * bad, total + bad)
        self._pending += 1
        if self._pending >= self.check_every:
            self.check()

    def check(self) -> None:
        """Fold the device counts into the host ones (one sync) and stop if over the limit."""
        self.fold()
        self._stop_if_over()

    def fold(self) -> None:
        """Fold the device counts into the host ones (one sync), without stopping: a checkpoint
        (a crash checkpoint too) is written whatever the counts say."""
        if self._device is not None:
            in_a_row, total = (int(v) for v in self._device)
            self.in_a_row, self.total, self._device, self._pending = in_a_row, self.total + total, None, 0

    def count(self) -> Tensor | float:
        """Non-finite updates so far, for logging without a sync (a device tensor while uncounted)."""
        return float(self.total) if self._device is None else self._device[1] + self.total

    def _stop_if_over(self) -> None:
        if self.in_a_row >= self.limit:
            raise UserError(
                f"loss was NaN/Inf for {self.in_a_row} steps in a row ({self.total} in total); "
                "lower optim.lr or algo.lr_*, or check the teacher (algo.max_nonfinite_steps sets the limit)"
            )


def load_teacher(path: str | None, *, data_vocab_size: int, length: int) -> tuple[LoadedBackbone, Process, bool]:
    """(frozen teacher, its process, time conditioning), checked against the data."""
    if not path:
        raise UserError("algo.teacher is required: a teacher checkpoint (.ckpt) or exported directory")
    teacher = load_backbone(path)
    if teacher.meta.process == "autoregressive":
        raise UserError(f"algo.teacher {path} is an autoregressive model; distillation needs a diffusion teacher")
    process, time_conditioning = process_from_meta(teacher.meta.to_dict(), teacher.config.vocab_size,
                                                   source=f"algo.teacher {path}")
    expected = process.network_vocab(data_vocab_size)  # e.g. the real tokens + a mask id
    if teacher.config.vocab_size != expected:
        extra = f" + {expected - data_vocab_size} (e.g. a mask)" if expected != data_vocab_size else ""
        raise UserError(
            f"algo.teacher vocab_size {teacher.config.vocab_size} does not match the data ({data_vocab_size} tokens"
            f"{extra} = {expected} for this teacher's process); distil on the data the teacher was trained on"
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


def content_hash(path: str | Path, legacy: bool = False) -> str:
    """SHA-256 of a checkpoint file, or of a directory's files (each name, size and bytes, sorted;
    not the temporaries an export killed mid-write may have left). `legacy`: the directory hash of
    earlier versions (names and bytes run together, so file `a` holding "bc" hashed as `ab`
    holding "c"), which a resume still accepts."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not is_temporary(p)) if path.is_dir() else [path]
    for file in files:
        name = str(file.relative_to(path)) if path.is_dir() else ""
        digest.update(name.encode() if legacy or not path.is_dir() else f"{name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


class Teacher:
    """A frozen teacher network with its process, loaded from `path` and checked against the data.

    The network is not trained and, until `swap_from` is called, not stored in student
    checkpoints: `path` (resolved) and `sha256` say where to reload it from and what it must be.
    """

    def __init__(self, path: str | None, *, data_vocab_size: int, length: int):
        loaded, self.process, self.time_conditioning = load_teacher(path, data_vocab_size=data_vocab_size, length=length)
        self.network: DiT = loaded.model
        self.meta = loaded.meta
        self.path = str(Path(path).expanduser().resolve())
        self.sha256 = content_hash(self.path)
        self.swapped = False

    @property
    def block_size(self) -> int | None:
        """Tokens per block of a block-diffusion teacher (BD3-LM layout), None for a plain one."""
        return int(self.meta.block_size or self.network.config.length) if self.meta.cross_attn else None

    @property
    def ignore_bos(self) -> bool:
        """Whether the teacher never saw a noisy first token (BD3-LM's ignore_bos)."""
        return bool(self.meta.extra.get("ignore_bos"))

    def student_block_size(self, asked: Any, length: int) -> int | None:
        """The student's block size: the teacher's (None for a plain teacher). `asked` is the
        config's `block_size` (None: not given); any other value is a one-line error."""
        if asked is None:
            return self.block_size
        if self.block_size is None and asked != length:
            raise UserError(f"block_size={asked}: the teacher '{self.path}' is not a block-diffusion model; a plain "
                            f"teacher distils into a plain student (leave block_size out)")
        if self.block_size is not None and asked != self.block_size:
            raise UserError(f"block_size={asked} differs from the teacher's block_size={self.block_size} ('{self.path}'); "
                            f"a block student takes its teacher's block size: leave block_size out or pass {self.block_size}")
        return self.block_size

    def swap_from(self, student: DiT) -> None:
        """Take a student's weights (its noise input, if any, is not part of a teacher)."""
        state = {k: v for k, v in student.state_dict().items() if not k.startswith("noise_proj.")}
        self.network.load_state_dict(state)
        self.network.requires_grad_(False).eval()
        self.swapped = True

    @property
    def in_checkpoint(self) -> bool:
        """A swapped teacher is no longer what `path` holds, so checkpoints must carry it."""
        return self.swapped

    def save_to(self, checkpoint: dict, prefix: str = TEACHER_PREFIX) -> None:
        """Drop the teacher's weights (under `prefix` in the state_dict) unless it was swapped;
        record whether it was, so a resumed run restores the teacher it had (SDTT's rounds)."""
        if not self.in_checkpoint:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefix)}
        checkpoint["teacher"] = {"swapped": self.swapped}

    def restore_from(self, checkpoint: dict, prefix: str = TEACHER_PREFIX) -> None:
        """The inverse of `save_to`, before Lightning loads the state_dict: a swapped teacher's
        weights are in it; otherwise the frozen weights loaded from `path` are put back."""
        self.swapped = bool(checkpoint.get("teacher", {}).get("swapped", False))
        if not self.swapped:
            checkpoint["state_dict"].update({f"{prefix}{k}": v for k, v in self.network.state_dict().items()})

    def provenance(self) -> dict:
        """Checkpoint metadata: where the teacher came from."""
        return {"teacher": self.path, "teacher_sha256": self.sha256}

    def check_moved(self, recorded: CheckpointMeta, source: str) -> None:
        """On resume: the teacher now given must be the one the run started from, by content, not
        by path (the run folder or the teacher may have moved); names both paths if it is not."""
        want = recorded.teacher_sha256
        if not want or want == self.sha256:
            return
        if Path(self.path).is_dir() and want == content_hash(self.path, legacy=True):
            return  # recorded with the directory hash of an earlier version
        raise UserError(f"{source} was distilled from teacher '{recorded.teacher}' (sha256 {want[:12]}…) "
                        f"but algo.teacher='{self.path}' has other contents (sha256 {self.sha256[:12]}…); "
                        "pass that teacher (a moved copy with the same bytes is accepted)")


def average_gradients(parameters, extra: Tensor) -> Tensor:
    """Average the gradients of `parameters` over the ranks, and sum `extra` (a scalar), in one
    all-reduce; returns the summed `extra`. A no-op (returning `extra`) in a single process.

    A parameter without a gradient counts as zeros, so every rank reduces the same buffer; one
    that has none on every rank keeps none (as in one process, where AdamW then leaves it alone).
    Learning which is one host sync per update (multi-process runs only)."""
    _, count = ranks.current()
    if count == 1:
        return extra
    params = [p for p in parameters if p.requires_grad]
    if any(is_sharded(p) for p in params):  # FSDP: its reduce-scatter averaged the gradients in backward
        extra = extra.reshape(1).to(torch.float32)
        torch.distributed.all_reduce(extra)
        return extra[0]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=extra.device)
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]
                     + [has_grad.to(grads[0].device) if grads else has_grad, extra.reshape(1).to(torch.float32)])
    torch.distributed.all_reduce(flat)
    offset, flags = 0, (flat[-1 - len(params): -1] > 0).tolist()  # one host sync (which parameters got a gradient)
    for p, g, flag in zip(params, grads, flags):
        p.grad = (flat[offset: offset + g.numel()] / count).view_as(g).to(g.dtype) if flag else None
        offset += g.numel()
    return flat[-1]


def take_over_gradient_sync(trainer) -> bool:
    """Under DDP, turn off the wrapper's gradient hooks for a manual-optimisation algo whose
    `Alternation` averages gradients itself; True if it did. Call at the start of every
    training_step, before its backward: Lightning turns the hooks back on after each step."""
    from torch.nn.parallel import DistributedDataParallel

    model = getattr(getattr(trainer, "strategy", None), "model", None)
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = False  # as inside DDP's no_sync(), for this step's backward
        return True
    return False


class Alternation:
    """Manual optimisation of networks in turns, with accumulation, clipping and a NaN guard."""

    def __init__(self, phases: PhaseSchedule, *, accumulate: int, clip: float | None, max_nonfinite: int,
                 check_every: int = 50):
        self.phases = phases
        self.guard = NonFiniteGuard(max_nonfinite, check_every)
        self.accumulate = accumulate
        self.clip = clip
        self.micro_step = 0
        self._nonfinite_losses: Tensor | None = None  # this update's count, on the device (no sync per micro-batch)

    def update_index(self) -> int:
        """Optimiser updates completed so far (each update is one network's step)."""
        return self.micro_step // self.accumulate

    def phase(self) -> str:
        return self.phases.phase(self.update_index())

    def step(self, loss: Tensor, *, backward: Callable[[Tensor], None], network: torch.nn.Module, optimizer,
             scheduler, after_update: Callable[..., None] | None = None) -> bool | Tensor:
        """Backward `loss`; on an update's last micro-batch average the gradients over the ranks,
        then, unless a loss of the update (on any rank) or the gradient is non-finite, clip and
        step; zero the gradients, step the schedule, then `after_update` (e.g. the EMA).
        Returns whether the optimiser updated the weights (False between micro-batches).

        With a fused optimiser (AdamW on CUDA) the skip is decided on the device, as GradScaler
        does (`found_inf`: the fused kernel leaves weights and state as they were), and
        `after_update(keep=...)` gets the device flag: the decision adds no host sync; the
        return value is then that flag, a bool tensor. Otherwise the decision is one host sync
        per update (free on a CPU), none per micro-batch, and a skipped update calls
        `after_update(keep=False)`: on both paths a skipped update leaves the EMA's shadow as it is
        and advances its warm-up count, so a run's EMA does not depend on the device."""
        bad = (~torch.isfinite(loss.detach())).any().to(torch.float32)
        self._nonfinite_losses = bad if self._nonfinite_losses is None else self._nonfinite_losses + bad
        backward(loss / self.accumulate)  # a non-finite loss poisons the gradient; the update is skipped below
        self.micro_step += 1
        if self.micro_step % self.accumulate:
            return False
        params = [p for p in network.parameters() if p.requires_grad]
        bad_total = average_gradients(params, self._nonfinite_losses)
        self._nonfinite_losses = None
        grads = [p.grad for p in params if p.grad is not None]
        norm = full(torch.nn.utils.get_total_norm(grads)) if grads else bad_total.new_zeros(())  # FSDP: over all shards
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper holds the torch optimiser
        if inner.defaults.get("fused"):
            return self._device_step(params, norm, bad_total > 0, optimizer, inner, scheduler, after_update)
        # NaN when any rank saw a non-finite loss: every rank holds the same reduced values, so
        # every rank decides alike
        signal = torch.where(bad_total > 0, torch.full_like(norm, float("nan")), norm)
        stepped = self.guard.ok(signal)
        if stepped and self.clip:
            torch.nn.utils.clip_grads_with_norm_(params, float(self.clip), norm)
        if not stepped:  # no gradient: AdamW leaves every parameter and its state as they are
            optimizer.zero_grad(set_to_none=True)
        optimizer.step()  # called either way: Lightning counts its steps (max_steps, checkpoint intervals)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if after_update is not None and stepped:
            after_update()
        elif after_update is not None:  # skipped: the shadow stays, its warm-up count advances (as `_device_step`'s)
            after_update(keep=torch.zeros((), dtype=torch.bool, device=norm.device))
        return stepped

    def _device_step(self, params, norm: Tensor, bad_loss: Tensor, optimizer, inner, scheduler, after_update) -> Tensor:
        bad = bad_loss | ~torch.isfinite(norm)
        self.guard.record(bad)
        if self.clip:  # NaN gradients when bad: the fused step below skips them
            torch.nn.utils.clip_grads_with_norm_(params, float(self.clip), norm)
        inner.found_inf = bad.to(torch.float32)
        try:
            optimizer.step()  # Lightning counts it either way
        finally:
            del inner.found_inf
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if after_update is not None:
            after_update(keep=~bad)
        return ~bad

    def state_dict(self) -> dict:
        self.guard.fold()  # one sync per checkpoint: the device counts become host ones
        return {"micro_step": self.micro_step, "nonfinite_total": self.guard.total,
                "nonfinite_in_a_row": self.guard.in_a_row}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.micro_step = int(state.get("micro_step", 0))
        self.guard.total = int(state.get("nonfinite_total", 0))
        self.guard.in_a_row = int(state.get("nonfinite_in_a_row", 0))  # older checkpoints: 0


def check_schedule(noise_cfg, data_vocab_size: int, process) -> None:
    """Students use the teacher's schedule; a configured `noise` that differs is an error."""
    configured = build_schedule(noise_cfg, data_vocab_size)
    if configured != process.schedule:
        raise UserError(
            f"noise ({configured.describe()}) disagrees with the teacher's schedule "
            f"({process.schedule.describe()}); students use the teacher's schedule: "
            f"pass noise={process.schedule.name} with the teacher's parameters"
        )


def noise_grid(settings: DistillationConfig, image_shape) -> list[int] | None:
    """The data's token grid (H, W[, C]) when the noise input is a pyramid (images), else None."""
    if settings.noise_pyramid is False or (settings.noise_pyramid is None and not image_shape):
        return None
    if not image_shape:
        raise UserError("algo.noise_pyramid=true needs image tokens (data with an image shape); "
                        "this data is text: use algo.noise_pyramid=false or null")
    return [int(n) for n in image_shape]


def generator_param_groups(generator: DiT, lr_generator: float, lr_noise_input: float | None) -> list[dict]:
    """The generator's parameters, its noise projection (if any) in a group of its own rate.

    A zero-init projection of pure noise gets gradients of random sign, which Adam turns
    into steps of full size: its weights random-walk unless their rate is kept small.
    """
    noise = [p for n, p in generator.named_parameters() if n.startswith("noise_proj.")]
    rest = [p for n, p in generator.named_parameters() if not n.startswith("noise_proj.")]
    groups = [{"params": rest}]
    if noise:
        groups.append({"params": noise, "lr": lr_noise_input or lr_generator})
    return groups
