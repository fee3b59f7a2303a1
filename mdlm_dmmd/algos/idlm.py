"""IDLM: Inverse-distilled Diffusion Language Models (Li et al. 2026, arXiv 2602.19066), the D-MMD paper's
concurrent method, as a baseline.

A frozen teacher θ, a generator η and a fake model φ, both copies of the teacher. Per batch:
t ~ antithetic U[ε, 1], z_t ~ q(z_t | x_data), x̂_η = x̂_η(z_t) (probability vectors: the relaxed,
"soft" generator output, §3.2); an independent t' re-noises x̂_η (stratified over the batch like t,
but in a randomly permuted stratum: drawn by row, as the official code does, t' would share t's
stratum, |t − t'| < 1/B), and both models are scored with
the teacher's own training loss ℓ (its NELBO, ELBO-weighted) on the soft target x̂_η:

    fake update:      min_φ ℓ_φ(sg x̂_η)                    (eq. 9; no teacher regulariser)
    generator update: min_η ℓ_θ(x̂_η) − ℓ_φ(x̂_η)            (eq. 10)

How x̂_η is re-noised (`renoise`), by the teacher's process:
- masked (MDLM): z_t' ~ Cat(α_t' x̂_η + (1 − α_t') e_mask), hard, no gradient through it; SUBS
  makes revealed positions exact, so only positions masked in z_t' carry a loss, and
  ∂(ℓ_θ − ℓ_φ)/∂x̂_η = w(t') (log x̂_φ − log x̂_θ) there.
- uniform with Duo's Gaussian schedule: w = α̃_t' x̂_η + σ̃_t' ε, fed to teacher and fake as the
  soft token softmax(w/τ) (IDLM eq. 6, App. E; τ = `algo.duo_temperature`), *with* gradient
  (reparameterisation), so gradients reach η through the models' inputs too; the loss's hard
  z_t' is argmax w. A uniform teacher with another schedule has no such latent and is refused.
  The generator's own input is the hard z_t ~ q(z_t | x_data), the τ → 0 limit that the official
  code reaches after Duo's curriculum (and what this package's Duo teachers were trained on).

Not k-specific: one generator, trained at continuous t on data-diffused inputs, is sampled with
the teacher's sampler at any number of steps. Fake first, `algo.fake_every` fake updates per
generator update; EMA (`training.ema`) on the generator and the fake model. Losses are summed
over positions and divided by B·L (the official code divides by B; Adam is invariant to the
scale up to its ε). Config: `configs/algo/idlm.yaml`.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from mdlm_dmmd.algos.base import AlgoBase, algo_section, build_settings, process_meta
from mdlm_dmmd.algos.distillation import (
    take_over_gradient_sync,
    TEACHER_PREFIX,
    Alternation,
    PhaseSchedule,
    Teacher,
    check_schedule,
    copy_of,
    is_int,
)
from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.denoiser import Denoiser
from mdlm_dmmd.diffusion import Process
from mdlm_dmmd.diffusion.sampling import DiffusionSampler, sample_categorical
from mdlm_dmmd.diffusion.schedules import DuoSchedule, build_schedule
from mdlm_dmmd.diffusion.uniform import UniformProcess
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT
from mdlm_dmmd.models.ema import EMA

logger = logging.getLogger(__name__)
WEIGHTINGS = ("elbo", "constant")


@dataclass
class IDLMConfig:
    """Mirror of configs/algo/idlm.yaml, validated once (every problem reported together)."""

    name: str = "idlm"
    teacher: str | None = None
    fake_every: int = 1
    weighting: str = "elbo"
    duo_temperature: float = 1e-3
    lr_generator: float = 1e-6
    lr_fake: float = 1e-6
    student_dropout: float = 0.0
    max_nonfinite_steps: int = 10

    @classmethod
    def from_mapping(cls, algo: Mapping[str, Any]) -> "IDLMConfig":
        config = build_settings(cls, algo, "an idlm")
        problems = []
        for key in ("fake_every", "max_nonfinite_steps"):
            if not is_int(getattr(config, key)) or getattr(config, key) < 1:
                problems.append(f"algo.{key} must be an int >= 1, got {getattr(config, key)!r}")
        if config.weighting not in WEIGHTINGS:
            problems.append(f"algo.weighting must be one of {', '.join(WEIGHTINGS)}, got {config.weighting!r}")
        for key in ("duo_temperature", "lr_generator", "lr_fake"):
            value = getattr(config, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                problems.append(f"algo.{key} must be a number > 0, got {value!r}")
        dropout = config.student_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            problems.append(f"algo.student_dropout must be a float in [0, 1), got {dropout!r}")
        if problems:
            raise UserError("; ".join(problems))
        if config.weighting != "elbo":
            logger.warning("algo.weighting=%s: IDLM's uniqueness theorem (its Thm. 3.1) holds for the teacher's "
                           "ELBO-weighted loss; other weightings are not covered by it", config.weighting)
        return config


# -- re-noising and losses: pure functions on tensors ----------------------------------------
def soft_marginal_kind(process: Process) -> str | None:
    """How a soft x̂ is re-noised for this process: 'masked' (a hard draw from the soft marginal
    α x̂ + (1 − α) e_mask), 'gaussian' (Duo's reparameterised latent), or None (not possible)."""
    if getattr(process, "mask_id", None) is not None and process.posterior_linear_in_x:
        return "masked"
    if getattr(process, "soft_corruption", False):
        return "gaussian"
    return None


def renoise(process: Process, x_probs: Tensor, t: Tensor, temperature: float, generator=None) -> tuple[Tensor, Tensor]:
    """(model input, hard z_t') for a soft x̂ [B, L, V] at times t.

    masked: z_t' ~ Cat(α_t x̂ + (1 − α_t) e_mask) drawn in float64, no gradient; the input is z_t'.
    gaussian (Duo): the input is softmax((α̃_t x̂ + σ̃_t ε)/τ) [B, L, V], differentiable in x̂
    (reparameterisation); z_t' is its argmax.
    """
    if soft_marginal_kind(process) == "masked":
        z = sample_categorical(process.marginal_probs(x_probs.detach(), t), generator)
        return z, z
    soft = process.corrupt_soft(x_probs, t, generator, temperature=temperature)
    return soft, soft.detach().argmax(-1)


def soft_loss(process: Process, log_p: Tensor, x_probs: Tensor, z_t: Tensor, t: Tensor, weighting: str) -> Tensor:
    """The teacher's training loss per token [B, L] on the soft target x̂: its NELBO
    (`process.nelbo_soft`), or with `constant` weighting the plain soft cross-entropy
    −Σ_c x̂_c log p_c on the positions the process denoises."""
    if weighting == "elbo":
        return process.nelbo_soft(log_p, x_probs, z_t, t)
    cross_entropy = -(x_probs.to(log_p.dtype) * log_p).sum(-1)
    return cross_entropy * process.denoising_positions(z_t).to(cross_entropy.dtype)


@contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """Parameters of `modules` take no gradient inside the block (inputs still may): the
    generator's loss runs through the teacher and the fake model without touching their grads."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class IDLM(AlgoBase):
    """Teacher θ (frozen), generator η and fake model φ (copies of the teacher); alternating
    manual updates, fake first; EMA on generator and fake. The generator is what checkpoints
    expose to `load_backbone` and sampling; the teacher is reloaded from its path."""

    settings: IDLMConfig
    backbone_prefix = "generator."
    not_in_checkpoint = (TEACHER_PREFIX,)

    @classmethod
    def settings_from(cls, config: Mapping[str, Any]) -> IDLMConfig:
        return IDLMConfig.from_mapping(algo_section(config))

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.settings = settings = self.settings_from(config)
        self.automatic_optimization = False
        self.teacher_part = Teacher(settings.teacher, data_vocab_size=self.data_vocab_size, length=self.cfg.model.length)
        # the process of the losses; the teacher's own (`teacher_part.process`) is the one sampled
        self.process, self.time_conditioning = self.training_process(), self.teacher_part.time_conditioning
        self.check_teacher()
        self.teacher = self.teacher_part.network
        self.generator = copy_of(self.teacher, dropout=settings.student_dropout)
        self.fake = copy_of(self.teacher, dropout=settings.student_dropout)
        self.alternation = Alternation(
            PhaseSchedule("aux", settings.fake_every),
            accumulate=int(self.cfg.trainer.get("accumulate_grad_batches", 1) or 1),
            clip=self.cfg.trainer.get("gradient_clip_val"), max_nonfinite=settings.max_nonfinite_steps,
            check_every=int(self.cfg.trainer.get("log_every_n_steps") or 50),
        )
        self.init_ema(self.generator)
        decay = float(self.cfg.training.get("ema", 0.0))
        self.fake_ema = EMA(self.fake, decay) if decay > 0 else None

    def training_process(self) -> Process:
        """The teacher's process, except for a public Duo checkpoint with `noise=duo`: it records no
        γ range (Duo keeps it in its algo config) and samples with the log-linear schedule, while
        it was trained, and IDLM-Duo trains, on the Gaussian latent of the γ schedule given here.
        The student then samples as its teacher does (`sampler`, checkpoint metadata)."""
        teacher = self.teacher_part.process
        configured = build_schedule(self.cfg.noise, self.data_vocab_size)
        public_duo = self.teacher_part.meta.extra.get("family") == "duo" and not teacher.soft_corruption
        if public_duo and isinstance(configured, DuoSchedule):
            return UniformProcess(configured, vocab_size=teacher.vocab_size)
        check_schedule(self.cfg.noise, self.data_vocab_size, teacher)
        return teacher

    def check_teacher(self) -> None:
        source = f"algo.teacher '{self.teacher_part.path}'"
        if self.teacher_part.block_size is not None:
            raise UserError(f"algo=idlm takes plain (non-block) teachers; {source} is a block-diffusion model")
        kind = soft_marginal_kind(self.process)
        if kind is None:
            hint = " (a public Duo checkpoint: pass noise=duo with the γ range it was trained with)" \
                if self.teacher_part.meta.extra.get("family") == "duo" else ""
            raise UserError(f"algo=idlm needs a teacher whose process has a soft marginal: masked, or uniform with Duo's "
                            f"Gaussian schedule (noise=duo){hint}; {source} is {self.process.name} with "
                            f"{self.process.schedule.describe()}, whose soft input would carry no gradient")
        if not hasattr(self.process, "nelbo_soft"):
            raise UserError(f"algo=idlm needs the teacher's loss on soft targets (nelbo_soft); the {self.process.name} "
                            f"process of {source} has none")

    @property
    def backbone(self) -> DiT:
        return self.generator

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def denoiser(self, network: torch.nn.Module) -> Denoiser:
        """`network` as sampled: with the teacher's process (its σ(t))."""
        return Denoiser(network, self.teacher_part.process, self.time_conditioning)

    def training_denoiser(self, network: torch.nn.Module) -> Denoiser:
        """`network` in the losses: with the training process (`training_process`)."""
        return Denoiser(network, self.process, self.time_conditioning)

    def sampler(self) -> DiffusionSampler:
        # The generator is a denoiser like its teacher, so it is sampled by the teacher's rule.
        return DiffusionSampler(self.teacher_part.process, self.teacher_part.meta.sampling_rule or "ancestral")

    # -- the losses -----------------------------------------------------------------------------
    def generate_soft(self, x_data: Tensor) -> Tensor:
        """x̂_η(z_t) [B, L, V] for z_t ~ q(z_t | x_data) at antithetic t (with gradient)."""
        t = self.data_times(x_data)
        z_t = self.process.corrupt(x_data, t, self.batch_share())
        return self.training_denoiser(self.generator)(z_t, t).exp()

    def renoised(self, x_probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(model input, hard z_t', t') for x̂ re-noised at an antithetic t' independent of the
        generator's t (the paper's separate expectation over t'; `renoise`)."""
        t = self.data_times(x_probs, independent=True)
        model_input, z = renoise(self.process, x_probs, t, self.settings.duo_temperature, self.batch_share())
        return model_input, z, t

    def model_loss(self, network: torch.nn.Module, x_probs: Tensor, renoised: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """ℓ_network(x̂): the teacher's training loss of `network` on the re-noised x̂, summed over tokens."""
        model_input, z, t = renoised
        log_p = self.training_denoiser(network)(model_input, t)
        return soft_loss(self.process, log_p, x_probs, z, t, self.settings.weighting).sum()

    def phase_loss(self, batch: Mapping[str, Tensor], phase: str) -> Tensor:
        """Eq. 9 (phase aux: the fake model) or eq. 10 (phase gen), per token (÷ B·L)."""
        x = batch["input_ids"]
        scale = 1.0 / x.numel()
        if phase == "aux":
            with torch.no_grad():
                x_probs = self.generate_soft(x)
                renoised = self.renoised(x_probs)
            return self.model_loss(self.fake, x_probs, renoised) * scale
        x_probs = self.generate_soft(x)
        with frozen(self.teacher, self.fake):  # gradients reach η only (through x̂ and, for Duo, the inputs)
            renoised = self.renoised(x_probs)  # one t' and one input for both models
            return (self.model_loss(self.teacher, x_probs, renoised) - self.model_loss(self.fake, x_probs, renoised)) * scale

    def training_step(self, batch, batch_idx):
        take_over_gradient_sync(self.trainer)  # DDP: the Alternation averages each update's gradients itself
        phase = self.alternation.phase()
        network, index = (self.generator, 0) if phase == "gen" else (self.fake, 1)
        loss = self.phase_loss(batch, phase)
        ema = self.ema if phase == "gen" else self.fake_ema
        self.alternation.step(loss, backward=self.manual_backward, network=network, optimizer=self.optimizers()[index],
                              scheduler=self.lr_schedulers()[index],
                              after_update=None if ema is None else (lambda keep=None: ema.update(network, keep)))
        name = "gen" if phase == "gen" else "fake"
        self.log(f"train/loss_{name}", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/nonfinite_steps", self.alternation.guard.count(), on_step=True, on_epoch=False)

    def configure_optimizers(self):
        gen = self.build_optimizer(self.generator.parameters(), self.cfg.optim, lr=self.settings.lr_generator)
        fake = self.build_optimizer(self.fake.parameters(), self.cfg.optim, lr=self.settings.lr_fake)
        return [gen["optimizer"], fake["optimizer"]], [gen["lr_scheduler"]["scheduler"], fake["lr_scheduler"]["scheduler"]]

    def loss(self, batch):
        """Validation: the generator's NELBO on held-out data (a drift diagnostic, as D-MMD's)."""
        x = batch["input_ids"]
        t = self.data_times(x)
        z_t = self.process.corrupt(x, t, self.batch_share())
        per_token = self.process.nelbo(self.training_denoiser(self.generator)(z_t, t), x, z_t, t)
        return per_token.sum(), torch.tensor(float(per_token.numel()), device=x.device)

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        self.teacher_part.save_to(checkpoint)
        checkpoint["idlm"] = {**self.alternation.state_dict(),
                              "fake_ema": None if self.fake_ema is None else self.fake_ema.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.teacher_part.restore_from(checkpoint)
        state = checkpoint.get("idlm", {})
        self.alternation.load_state_dict(state)
        if self.fake_ema is not None and state.get("fake_ema") is not None:
            self.fake_ema.load_state_dict(state["fake_ema"])

    def checkpoint_meta(self) -> dict:
        # No sampling_steps: the generator is not trained for one k (sampling.steps picks it).
        return {**super().checkpoint_meta(), **process_meta(self.teacher_part.process, self.time_conditioning),
                "sampling_rule": self.sampler().rule, **self.teacher_part.provenance(),
                **({"loss": self.teacher_part.meta.loss} if self.teacher_part.meta.loss else {})}

    def check_resume_meta(self, recorded: CheckpointMeta, path: str) -> None:
        self.teacher_part.check_moved(recorded, f"checkpoint '{path}'")
