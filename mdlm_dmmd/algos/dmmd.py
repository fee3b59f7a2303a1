"""D-MMD: Discrete Moment Matching Distillation (Hoogeboom et al., paper Algorithm 1, §3, §6.5).

Distils a frozen masked teacher x̂_θ into a k-step generator x̂_η with an auxiliary denoiser
x̂_φ that tracks the generator's own conditional expectation. One update of Algorithm 1:

    s ~ U(0,1), δ ~ U(0, 1/k), t = min(1, s + δ); z_t ~ q(z_t | x_data)
    p = x̂_η(z_t) (fresh noise input); x ~ Cat(p) in float64; z_s ~ q(z_s | z_t, x), no gradient
    generator update: L_GEN = −w(s) Σ_c p_c (log x̂_θ(z_s) − log x̂_φ(z_s))_c          (eq. 11)
    aux update:       L_AUX = −w(s) Σ_c (x + x̂_θ(z_s))_c log x̂_φ(z_s)_c              (eq. 12)

Teacher temperature τ and top-p (§3.3) modify x̂_θ in both losses: log x̂_θ / τ, then logits
outside the nucleus (computed on the tempered distribution over the real vocabulary) are
lowered by Δ instead of −∞, then renormalised. We apply the modified teacher in L_AUX's
regulariser as well, so that the auxiliary fixed point (x̂_φ = x̂_θ at the optimum) is the
distribution being distilled.

Choices the paper leaves open are config keys marked "not from the paper" in
`configs/algo/dmmd.yaml`: w(s), the aux/generator update ratio, which update comes first,
learning rates, EMA and the noise-input width. Losses are summed over positions still masked in
z_s (elsewhere SUBS makes teacher and aux agree exactly) and divided by B·L, as MDLM does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Mapping

import torch
import torch.utils.checkpoint
from torch import Tensor

from mdlm_dmmd import rng
from mdlm_dmmd.algos.base import AlgoBase, algo_section, process_meta
from mdlm_dmmd.algos.distillation import (
    take_over_gradient_sync,
    TEACHER_PREFIX,
    Alternation,
    DistillationConfig,
    PhaseSchedule,
    Teacher,
    check_schedule,
    copy_of,
    generator_param_groups,
    is_int,
    noise_grid,
)
from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.denoiser import BlockDenoiser, Denoiser
from mdlm_dmmd.diffusion import Process, block
from mdlm_dmmd.diffusion.block_sampling import BlockSampler
from mdlm_dmmd.diffusion.sampling import DiffusionSampler, sample_categorical, sample_categorical_at, top_p_mask
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT

WEIGHTINGS = ("constant", "elbo")
LOSS_SPACES = ("auto", "x0", "posterior")


@dataclass
class DMMDConfig(DistillationConfig):
    """Mirror of configs/algo/dmmd.yaml (shared keys in DistillationConfig), validated once."""

    name: str = "dmmd"
    sampling_steps: int = 8
    loss_space: str = "auto"
    posterior_ds: float = 1e-3
    aux_target: str | None = None
    weighting: str = "constant"
    teacher_temperature: float = 1.0
    teacher_top_p: float = 1.0
    top_p_delta: float = 2.0

    def problems(self) -> list[str]:
        found = super().problems()
        if not is_int(self.sampling_steps) or self.sampling_steps < 1:
            found.append(f"algo.sampling_steps must be an int >= 1, got {self.sampling_steps!r}")
        if self.aux_target not in (None, "soft", "hard"):
            found.append(f"algo.aux_target must be soft or hard (or null: soft for masked, hard for uniform), got {self.aux_target!r}")
        if self.loss_space not in LOSS_SPACES:
            found.append(f"algo.loss_space must be one of {', '.join(LOSS_SPACES)}, got {self.loss_space!r}")
        if not 0 < self.posterior_ds < 1:
            found.append(f"algo.posterior_ds must be in (0, 1), got {self.posterior_ds}")
        if self.weighting not in WEIGHTINGS:
            found.append(f"algo.weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if not self.teacher_temperature > 0:
            found.append(f"algo.teacher_temperature must be > 0, got {self.teacher_temperature}")
        if not 0 < self.teacher_top_p <= 1:
            found.append(f"algo.teacher_top_p must be in (0, 1], got {self.teacher_top_p}")
        if not self.top_p_delta >= 0:
            found.append(f"algo.top_p_delta must be >= 0, got {self.top_p_delta}")
        return found

    def for_teacher(self, process: Process, teacher_meta: CheckpointMeta) -> "DMMDConfig":
        resolved = super().for_teacher(process, teacher_meta)
        # Where the posterior is not linear in x (uniform), an ELBO-trained teacher's x̂ is not
        # E[x | z_t] (App. D): its losses live in posterior space, and the auxiliary target must
        # be the hard x (§3.2). Masked and CE-trained uniform teachers use eqs. 11-12 (x0 space).
        space = ("posterior" if elbo_not_mean(process, teacher_meta) else "x0") if self.loss_space == "auto" \
            else self.loss_space
        target = ("soft" if process.posterior_linear_in_x else "hard") if self.aux_target is None else self.aux_target
        return replace(resolved, loss_space=space, aux_target=target)

    def teacher_problems(self, process: Process, teacher_meta: CheckpointMeta) -> list[str]:
        found = []
        if not process.posterior_linear_in_x and self.aux_target == "soft":
            found.append("algo.aux_target=soft is only valid for masked teachers (a posterior linear in x, paper "
                         "§3.2); use hard for uniform")
        if self.weighting == "elbo" and not process.has_elbo_weight:
            found.append("algo.weighting=elbo needs a masked teacher: the uniform process has no scalar ELBO weight "
                         "(its NELBO is not w(t) times a cross-entropy); use algo.weighting=constant")
        if self.loss_space == "x0" and elbo_not_mean(process, teacher_meta):
            found.append("algo.loss_space=x0 needs a masked teacher or a uniform one trained with algo.loss=ce; "
                         "this uniform teacher was trained with the ELBO: use algo.loss_space=posterior (App. D)")
        return found


def elbo_not_mean(process: Process, teacher_meta: CheckpointMeta) -> bool:
    """Whether the teacher's x̂ is the ELBO optimum rather than E[x | z_t]: an ELBO-trained
    teacher of a process whose posterior is not linear in x (App. D)."""
    return not process.posterior_linear_in_x and (teacher_meta.loss or "elbo") != "ce"


POSTERIOR_CHUNK = 1 << 22  # [., V] entries per chunk of the posterior-space loss (32 MB in float64)


# -- losses: pure functions on tensors ------------------------------------------------------
def distillation_times(shape, k: int, device, generator=None) -> tuple[Tensor, Tensor]:
    """Algorithm 1: s ~ U(0,1), δ ~ U(0, 1/k), t = min(1, s + δ). Two tensors of `shape` (an
    int n: [n]); `generator` may be a `rng.BatchShare` (then shape[0] is the batch)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    s = rng.rand(shape, generator, device=device)
    delta = rng.rand(shape, generator, device=device) / k
    return s, torch.clamp(s + delta, max=1.0)


def modified_teacher(log_p: Tensor, temperature: float = 1.0, top_p: float = 1.0, delta: float = 2.0) -> Tensor:
    """§3.3: log x̂_θ / τ, then Δ-lowering outside the nucleus, renormalised. [.., V] log-probs.

    The nucleus is computed on the tempered distribution; SUBS gives the mask token ≈ 0
    probability, so it never enters the nucleus and stays ≈ 0 after renormalisation.
    """
    if temperature == 1.0 and top_p >= 1.0:
        return log_p
    scores = torch.log_softmax(log_p / temperature, dim=-1)
    if top_p < 1.0:
        outside = ~top_p_mask(scores, top_p)
        scores = torch.log_softmax(scores - outside.to(scores.dtype) * delta, dim=-1)
    return scores


def generator_loss(p_gen: Tensor, log_p_teacher: Tensor, log_p_aux: Tensor, weight: Tensor) -> Tensor:
    """Eq. 11 per token: −w · Σ_c p_η,c (log x̂_θ − log x̂_φ)_c; gradient only through p_gen. [B, L]"""
    difference = (log_p_teacher - log_p_aux).detach()
    return -weight * (p_gen * difference).sum(-1)


class Expectation(torch.autograd.Function):
    """Σ_c p_c d_c per row for p = exp(log_p), differentiated in log_p only (d is a constant):
    the gradient p ⊙ d is the forward's product, kept, so each direction is one [N, V] pass
    (autograd's exp → mul → sum takes three, with a copy of p). `d` is overwritten with the
    product (the caller gives it up): no new [N, V] tensor in either direction."""

    @staticmethod
    def forward(ctx, log_p: Tensor, p: Tensor, d: Tensor) -> Tensor:
        product = d.mul_(p)
        ctx.save_for_backward(product)
        return product.sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (product,) = ctx.saved_tensors
        return product.mul_(grad[..., None]), None, None


def aux_loss(target: Tensor, p_teacher: Tensor, log_p_aux: Tensor, weight: Tensor) -> Tensor:
    """Eq. 12 per token: −w · Σ_c (x + x̂_θ)_c log x̂_φ,c; x one-hot (hard) or x̂_η (soft). [B, L]"""
    return -weight * ((target + p_teacher).detach() * log_p_aux).sum(-1)


def posterior_step_weight(s: Tensor, ds: float) -> Tensor:
    """1 / (s − s_prev) with s_prev = max(s − ds, 0) (App. D's 1/ds): [B, 1] for s per sequence
    [B], [B, L] for s per token (block diffusion).

    Near s = 0 the step is clamped to s_prev = 0, so the weight is that of the step actually
    taken, 1/s, not 1/ds; elsewhere it is exactly 1/ds.
    """
    s = s[:, None] if s.dim() == 1 else s
    return torch.where(s < ds, 1 / s.clamp_min(1e-12), torch.full_like(s, 1 / ds))


def output_entropy(p: Tensor, where: Tensor) -> Tensor:
    """Mean entropy of the categorical p [B, L, V] over positions `where` [B, L] (paper Table 6)."""
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return (h * where).sum() / where.sum().clamp_min(1)


class DMMD(AlgoBase):
    """Teacher θ (frozen), generator η and auxiliary φ (copies of the teacher), alternating
    manual updates, EMA on the generator. The generator is what checkpoints expose to
    `load_backbone` and sampling (`backbone_prefix`); the teacher is reloaded from its path.

    A block-diffusion teacher (BD3-LM layout) gives a block student: Algorithm 1 per block, with
    s, t drawn per (sequence, block), every network on [z, x_0] (the data's clean blocks as the
    prefix of each noisy block), `sampling_steps` steps per block when sampling."""

    settings: DMMDConfig
    backbone_prefix = "generator."
    not_in_checkpoint = (TEACHER_PREFIX,)  # self.teacher: unless swapped, reloaded from its path
    block_diffusion = True  # the student takes a block teacher's block size (Teacher.student_block_size)

    @classmethod
    def settings_from(cls, config: Mapping[str, Any]) -> DMMDConfig:
        return DMMDConfig.from_mapping(algo_section(config))

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        settings = self.settings_from(config)
        self.automatic_optimization = False
        self.teacher_part = Teacher(settings.teacher, data_vocab_size=self.data_vocab_size, length=self.cfg.model.length)
        self.process, self.time_conditioning = self.teacher_part.process, self.teacher_part.time_conditioning
        self.block = self.teacher_part.student_block_size(self.cfg.get("block_size"), int(self.cfg.model.length))
        if self.first_token_clean and self.cfg.vocab.get("bos_id") is None:
            raise UserError(f"algo.teacher '{settings.teacher}' was trained with ignore_bos (every sequence starts "
                            "with BOS, never noised), but this data has no BOS token (vocab.bos_id): distil it on "
                            "data with one, as it was trained")
        if self.block is not None and settings.noise_pyramid:
            raise UserError("algo.noise_pyramid=true needs a plain teacher: a block student samples one block at a "
                            "time and the pyramid spans the whole image; use algo.noise_pyramid=false or null")
        check_schedule(self.cfg.noise, self.data_vocab_size, self.process)
        # Open choices that depend on the teacher (e.g. noise input on for masked, off for uniform).
        self.settings = settings = settings.for_teacher(self.process, self.teacher_part.meta)
        self.teacher = self.teacher_part.network
        image_shape = self.cfg.vocab.get("image_shape") if self.block is None else None  # block: white noise
        noise = {"noise_dim": settings.noise_dim, "noise_grid": noise_grid(settings, image_shape)}
        self.generator = copy_of(self.teacher, **(noise if settings.noise_input else {}), dropout=settings.student_dropout)
        self.aux = copy_of(self.teacher, dropout=settings.student_dropout)
        self.alternation = Alternation(
            PhaseSchedule(settings.first_step, settings.aux_steps_per_gen_step),
            accumulate=int(self.cfg.trainer.get("accumulate_grad_batches", 1) or 1),
            clip=self.cfg.trainer.get("gradient_clip_val"), max_nonfinite=settings.max_nonfinite_steps,
            check_every=int(self.cfg.trainer.get("log_every_n_steps") or 50),
        )
        # 0-d tensors, read (a host sync) only when a checkpoint is written or the mean is asked for
        self.recent_gen_entropy: deque[Tensor | float] = deque(maxlen=100)
        self.init_ema(self.generator)

    # The generator is what base-class helpers (checkpoint meta, EMA, sampling) call "backbone".
    @property
    def backbone(self) -> DiT:
        return self.generator

    def train(self, mode: bool = True):
        """Lightning switches every submodule to train mode; the teacher stays in eval (no dropout)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def log_probs(self, network: DiT, z: Tensor, t: Tensor, clean: Tensor | None = None,
                  at: Tensor | None = None, generator=None) -> Tensor:
        """x̂(z) of one of the three networks as log-probs [B, L, V] (fresh generator noise), or
        [N, V] at the positions `at` only; a block student's networks see [z, clean] (`BlockDenoiser`)."""
        if self.block is None:
            return self.denoiser(network)(z, t, generator, at=at)
        return self.denoiser(network)(z, t, generator, clean=clean, at=at)

    def denoiser(self, network: torch.nn.Module) -> Denoiser:
        if self.block is None:
            return Denoiser(network, self.process, self.time_conditioning)
        return BlockDenoiser(network, self.process, self.time_conditioning, block_size=self.block)

    def sampler(self) -> DiffusionSampler | BlockSampler:
        # Students sample with the generator rule of Algorithm 1 (hard x, then the posterior).
        if self.block is None:
            return DiffusionSampler(self.process, "generator")
        bos = self.cfg.vocab.get("bos_id") if self.teacher_part.ignore_bos else None
        return BlockSampler(self.process, self.block, "generator", first_token=bos)

    def times(self, x: Tensor, draw) -> tuple[Tensor, ...]:
        """`draw(shape)` for shape (B,) (plain) or (B, n_blocks) (block: then spread to tokens [B, L])."""
        batch, length = x.shape
        if self.block is None:
            return draw((batch,))
        return tuple(block.per_token(u.view(batch, -1), self.block) for u in draw((batch, length // self.block)))

    @property
    def first_token_clean(self) -> bool:
        """A block teacher trained with ignore_bos never saw a noisy first token (nor scored it)."""
        return self.block is not None and self.teacher_part.ignore_bos

    def keep_first(self, z: Tensor, x: Tensor) -> Tensor:
        """z with its first token clean (x's), where the teacher never saw it noisy: in z_t and,
        as a uniform posterior may re-noise it, in z_s too."""
        if self.first_token_clean:
            z = z.clone()
            z[:, 0] = x[:, 0]
        return z

    def scored(self, where: Tensor) -> Tensor:
        """Positions a loss counts: `where` without the first token when it is kept clean."""
        if self.first_token_clean:
            where = where.clone()
            where[:, 0] = 0
        return where

    # -- training: alternating phases ---------------------------------------------------------
    def training_step(self, batch, batch_idx):
        take_over_gradient_sync(self.trainer)  # DDP: the Alternation averages each update's gradients itself
        phase = self.alternation.phase()
        index = 0 if phase == "gen" else 1
        network = self.generator if phase == "gen" else self.aux
        loss, logs = self.phase_loss(batch, phase)
        ema = (lambda keep=None: self.ema.update(self.generator, keep)) if phase == "gen" and self.ema is not None else None
        self.alternation.step(loss, backward=self.manual_backward, network=network, optimizer=self.optimizers()[index],
                              scheduler=self.lr_schedulers()[index], after_update=ema)
        if "gen_entropy" in logs:
            self.recent_gen_entropy.append(logs["gen_entropy"].detach())  # no float(): no sync per step
        self.log(f"train/loss_{phase}", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        for key, value in logs.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False)
        self.log("train/nonfinite_steps", self.alternation.guard.count(), on_step=True, on_epoch=False)

    def mean_gen_entropy(self) -> float:
        """Generator output entropy (paper Table 6) averaged over the last 100 auxiliary steps
        (measured there, where the generator runs without gradient)."""
        return sum(map(float, self.recent_gen_entropy)) / max(len(self.recent_gen_entropy), 1)

    def configure_optimizers(self):
        st = self.settings
        gen = self.build_optimizer(generator_param_groups(self.generator, st.lr_generator, st.lr_noise_input),
                                   self.cfg.optim, lr=st.lr_generator)
        aux = self.build_optimizer(self.aux.parameters(), self.cfg.optim, lr=st.lr_aux)
        return [gen["optimizer"], aux["optimizer"]], [gen["lr_scheduler"]["scheduler"], aux["lr_scheduler"]["scheduler"]]

    # -- validation: the generator as a one-step denoiser (a drift diagnostic) ----------------
    def loss(self, batch):
        x = batch["input_ids"]
        if self.block is None:
            t = self.data_times(x)
        else:
            t = block.per_token(self.data_times(x, x.shape[1] // self.block).view(x.shape[0], -1), self.block)
        share = self.batch_share()
        z_t = self.keep_first(self.process.corrupt(x, t, share), x)
        per_token = self.process.nelbo(self.log_probs(self.generator, z_t, t, clean=x, generator=share), x, z_t, t)
        counted = self.scored(torch.ones_like(per_token))
        return (per_token * counted).sum(), counted.sum()

    # -- checkpoints: the teacher is reloaded from its path unless swapped (the Teacher part) ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        self.teacher_part.save_to(checkpoint)
        checkpoint["distillation"] = {**self.alternation.state_dict(), "recent_gen_entropy": [float(value) for value in self.recent_gen_entropy]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.teacher_part.restore_from(checkpoint)
        state = checkpoint.get("distillation", {})
        self.alternation.load_state_dict(state)
        self.recent_gen_entropy.extend(state.get("recent_gen_entropy", []))

    def checkpoint_meta(self) -> dict:
        # k travels with the student, so `mode=sample` uses it unless sampling.steps is given; the
        # teacher by resolved path and content hash, so a resume can accept a moved copy of it.
        st = self.settings
        blocks = {} if self.block is None else \
            {"block_size": self.block, "cross_attn": True, "ignore_bos": self.teacher_part.ignore_bos}
        return {**super().checkpoint_meta(), **process_meta(self.process, self.time_conditioning),
                "sampling_rule": self.sampler().rule, **self.teacher_part.provenance(), "sampling_steps": st.sampling_steps,
                "teacher_top_p": st.teacher_top_p, "teacher_temperature": st.teacher_temperature, **blocks}

    def check_resume_meta(self, recorded: CheckpointMeta, path: str) -> None:
        """`training.check_resume` hook: the teacher may have moved, but it must hold the same bytes."""
        self.teacher_part.check_moved(recorded, f"checkpoint '{path}'")

    def weight(self, s: Tensor) -> Tensor:
        """w(s): [B, 1] for s per sequence, [B, L] per token (block). Not from the paper: constant
        1 by default, or the ELBO 1/s."""
        s = s[:, None] if s.dim() == 1 else s
        if self.settings.weighting == "elbo":
            return self.process.elbo_weight(s.clamp_min(self.cfg.training.sampling_eps))
        return torch.ones_like(s)

    def phase_loss(self, batch, phase):
        st = self.settings
        x_data = batch["input_ids"]  # [B, L]
        B, L = x_data.shape
        # 1. times, z_t ~ q(z_t | x_data), generator prediction, hard x, z_s ~ q(z_s | z_t, x)
        # (block student: s, t per (sequence, block), spread over its tokens; x_data is the clean prefix)
        # every draw from the share of the global batch: the same per example on any number of processes
        share = self.batch_share()
        s, t = self.times(x_data, lambda shape: distillation_times(shape, st.sampling_steps, x_data.device, share))
        z_t = self.keep_first(self.process.corrupt(x_data, t, share), x_data)
        if st.loss_space == "x0" and self.process.deterministic_prior:
            return self.masked_phase_loss(x_data, s, t, z_t, phase, share)
        with torch.set_grad_enabled(phase == "gen"):
            p_gen = self.log_probs(self.generator, z_t, t, clean=x_data, generator=share).exp()  # [B, L, V]
        x = sample_categorical(p_gen.detach(), share)  # float64 draw
        z_s = self.keep_first(self.process.sample_posterior(z_t, x, t, s, share), x_data)
        # 2. teacher (tempered / nucleus-lowered, §3.3) and auxiliary at z_s
        with torch.no_grad():
            log_p_teacher = modified_teacher(self.log_probs(self.teacher, z_s, s, clean=x_data), st.teacher_temperature,
                                             st.teacher_top_p, st.top_p_delta)
        with torch.set_grad_enabled(phase == "aux"):
            log_p_aux = self.log_probs(self.aux, z_s, s, clean=x_data)
        # 3. the phase's loss, in x0 space (eqs. 11-12) or posterior space (App. D, eqs. 24-26)
        if phase == "gen":
            target = p_gen
        elif st.aux_target == "soft":
            target = p_gen.detach()
        else:
            target = torch.nn.functional.one_hot(x, p_gen.shape[-1]).to(p_gen.dtype)
        w = self.weight(s)
        if st.loss_space == "posterior":
            per_token = self.posterior_space_loss(phase, target, log_p_teacher, log_p_aux, z_s, s,
                                                  w * posterior_step_weight(s, st.posterior_ds))
        elif phase == "gen":
            per_token = generator_loss(target, log_p_teacher, log_p_aux, w)
        else:
            per_token = aux_loss(target, log_p_teacher.exp(), log_p_aux, w)
        where = self.scored(self.process.denoising_positions(z_s).to(per_token.dtype))
        loss = ((per_token * where).sum() / (B * L)).float()
        if phase == "gen":  # the generator's output entropy is measured at auxiliary steps (no gradient there)
            return loss, {"s": s.mean()}
        noisy_t = self.scored(self.process.denoising_positions(z_t).float())
        return loss, {"gen_entropy": output_entropy(p_gen.detach(), noisy_t), "s": s.mean()}

    def masked_phase_loss(self, x_data: Tensor, s: Tensor, t: Tensor, z_t: Tensor, phase: str, share=None):
        """`phase_loss` for a masked teacher in x0 space, on gathered rows: the hard draw, both
        losses and the generator's entropy live on the tokens masked in z_t (those of z_s are a
        subset), so each network's output head runs there only and every [., V] tensor has one
        row per such token ([N, V], no [B, L, V] one: at V = 50k and B·L = 32k tokens a float32
        [B, L, V] is 6.6 GB). The tokens z_s reveals are drawn first (`draw_updated_positions`),
        then x ~ Cat(x̂_η) where it is used: at those tokens, and at every masked token for the
        hard auxiliary target (its one-hot x where z_s stays masked)."""
        st = self.settings
        B, L = x_data.shape
        noisy = self.scored(self.process.denoising_positions(z_t).float()).bool()  # [B, L]
        with torch.set_grad_enabled(phase == "gen"):
            log_p_gen = self.log_probs(self.generator, z_t, t, clean=x_data, at=noisy, generator=share)  # [N_t, V]
        p_gen = log_p_gen.detach().exp()  # the generator's gradient comes through log_p_gen (`Expectation`)
        revealed = self.process.draw_updated_positions(z_t, t, s, share) & noisy
        hard_target = phase == "aux" and st.aux_target == "hard"
        drawn = noisy if hard_target else revealed  # where x ~ Cat(x̂_η) is needed
        x = torch.full_like(z_t, -1)
        x[drawn] = sample_categorical_at(p_gen[drawn[noisy]], drawn, share)  # float64 CDF per row
        z_s = torch.where(revealed, x, z_t)
        left = noisy & ~revealed  # masked in z_s: where the losses count
        rows = left[noisy]  # those among the N_t rows (row-major order is kept)
        with torch.no_grad():
            log_p_teacher = modified_teacher(self.log_probs(self.teacher, z_s, s, clean=x_data, at=left),
                                             st.teacher_temperature, st.teacher_top_p, st.top_p_delta)
        with torch.set_grad_enabled(phase == "aux"):
            log_p_aux = self.log_probs(self.aux, z_s, s, clean=x_data, at=left)  # [N_s, V]
        w = self.weight(s).expand(B, L)[left]  # [N_s]
        if phase == "gen":
            # eq. 11 on the N_t rows of log_p_gen, the difference zero where z_s is revealed:
            # −w · Σ_c p_η,c (log x̂_θ − log x̂_φ)_c, with gradient p_η ⊙ difference (`Expectation`)
            difference = torch.zeros_like(p_gen)
            difference[rows] = log_p_teacher.sub_(log_p_aux)  # the teacher's log-probs are not needed again
            row_weight = torch.zeros_like(p_gen[:, 0])
            row_weight[rows] = w.to(row_weight.dtype)
            return (-(row_weight * Expectation.apply(log_p_gen, p_gen, difference)).sum() / (B * L)).float(), \
                {"s": s.mean()}
        # eq. 12, −w · Σ_c (x + x̂_θ)_c log x̂_φ,c, with x + x̂_θ built in place in the teacher's
        # log-probs (not needed again): the one-hot x is added at its index, never materialised
        target_and_teacher = log_p_teacher.exp_()
        if hard_target:
            target_and_teacher[torch.arange(len(w), device=w.device), x[left]] += 1.0
        else:
            target_and_teacher += p_gen[rows]
        loss = (-(w * (target_and_teacher * log_p_aux).sum(-1)).sum() / (B * L)).float()
        # the generator's output entropy (Table 6), at auxiliary steps only (the generator runs
        # without gradient there; the mask's NEG_INF times p = 0 adds 0)
        entropy = -p_gen.mul_(log_p_gen).sum(-1).mean() if p_gen.shape[0] else p_gen.new_zeros(())  # p_gen is done
        return loss, {"gen_entropy": entropy, "s": s.mean()}

    def posterior_space_loss(self, phase: str, target: Tensor, log_p_teacher: Tensor, log_p_aux: Tensor,
                             z_s: Tensor, s: Tensor, w: Tensor) -> Tensor:
        """App. D (eqs. 24-26): the phase's loss per token [B, L] with target, teacher and
        auxiliary mapped to π(·, z_s) = q(z_{s−ds} | z_s, ·) in float64.

        Each posterior is several float64 [., V] tensors; over all of [B, L, V] at once, and
        kept for the backward pass, they would be the step's largest memory (13 GB each at
        B = 32, L = 1024, V = 50k). So the loss runs over `POSTERIOR_CHUNK` entries of rows at a
        time, each chunk under activation checkpointing (recomputed in backward, not stored):
        peak float64 memory is a few chunks, whatever B · L is. Same numbers and gradients as
        one pass (tested)."""
        B, L, V = log_p_aux.shape
        # float64 times: α(s) − α(s − ds) is ~ds, which float32 times would know to ~6e-5 of itself
        # (s_prev clamped to 0 takes the schedule's α(0): a step of size s, weighted 1/s)
        s = s.double()
        s_prev = (s - self.settings.posterior_ds).clamp_min(0)
        rows = lambda u: (u[:, None] if u.dim() == 1 else u).expand(B, L).reshape(1, B * L)  # noqa: E731
        flat = lambda u: u.reshape(1, B * L, V)  # noqa: E731
        tensors = (flat(target), flat(log_p_teacher), flat(log_p_aux), z_s.reshape(1, B * L), rows(s), rows(s_prev),
                   rows(w.to(log_p_aux.dtype)))
        size = max(1, POSTERIOR_CHUNK // V)
        parts = []
        for start in range(0, B * L, size):
            chunk = [u[:, start: start + size] for u in tensors]
            if torch.is_grad_enabled():
                parts.append(torch.utils.checkpoint.checkpoint(self._posterior_chunk, phase, *chunk, use_reentrant=False))
            else:
                parts.append(self._posterior_chunk(phase, *chunk))
        return torch.cat(parts, dim=1).view(B, L)

    def _posterior_chunk(self, phase, target, log_p_teacher, log_p_aux, z_s, s, s_prev, w) -> Tensor:
        target = self.to_posterior(target, z_s, s, s_prev)
        teacher_probs = self.to_posterior(log_p_teacher.exp(), z_s, s, s_prev)
        log_p_aux = torch.log(self.to_posterior(log_p_aux.exp(), z_s, s, s_prev).clamp_min(1e-300))
        if phase == "gen":
            return generator_loss(target, torch.log(teacher_probs.clamp_min(1e-300)), log_p_aux, w)
        return aux_loss(target, teacher_probs, log_p_aux, w)

    def to_posterior(self, probs: Tensor, z_s: Tensor, s: Tensor, s_prev: Tensor) -> Tensor:
        """π(x̂, z_s) = q(z_{s−ds} | z_s, x̂), eq. 4 from s to s − ds (App. D). [B, L, V] float64"""
        return self.process.posterior_probs(z_s, probs, s, s_prev)
