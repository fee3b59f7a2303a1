"""The one shared LightningModule: config, backbone, EMA, optimiser, validation NLL, sampling.

Every built-in algo (and any third-party one that wants it) subclasses `AlgoBase` once and
supplies `loss(batch) -> (sum of per-token losses, token count)`; SDTT/D-MMD/IDLM add their
extra networks by composition. The host calls algos only through this surface:

    algo = AlgoClass(config)              # config: the composed, resolved Hydra tree as a dict
    trainer.fit(algo, train_loader, valid_loader)
    algo.generate(num_samples, steps=..., generator=...)   # [B, L] token ids, via algo.pipeline()

An algo says how its networks are evaluated (`denoiser(network)`: used by its losses and by
sampling alike) and how they are sampled (`sampler()`); `pipeline(network)` joins the two.

Checkpoints carry, next to Lightning's own keys, `ckpt["mdlm_dmmd"]` (backbone config, the
state-dict prefix of the network to sample, process/schedule names) and `ckpt["ema"]` (named
EMA shadow), so `mdlm_dmmd.checkpoints.load_backbone` can restore a sampler without this class,
and `ckpt["rng"]`, the global torch RNG at the save, so that a resumed run draws the same noise
as one that never stopped (the train loader's position is in Lightning's own loop state).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from mdlm_dmmd import rng
from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.diffusion.block import check_block_size
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.dit import DiT, DiTConfig
from mdlm_dmmd.models.ema import EMA
from mdlm_dmmd.pipeline import Pipeline
from mdlm_dmmd.public_config import dit_config_to_public


def backbone_config(cfg: DictConfig, vocab_size: int, *, causal: bool = False, noise_dim: int = 0) -> DiTConfig:
    """DiTConfig from the Hydra `model` node; `vocab_size` includes a mask token if any."""
    m = cfg.model
    length = m.get("length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise UserError(f"model.length must be a positive int, got {length!r}")
    config = DiTConfig(
        vocab_size=vocab_size,
        length=length,
        hidden_dim=m.hidden_dim,
        cond_dim=m.cond_dim,
        n_blocks=m.n_blocks,
        n_heads=m.n_heads,
        dropout=m.dropout,
        causal=causal,
        attn_backend=m.get("attn_backend", "auto"),
        noise_dim=noise_dim,
    )
    config.validate()
    return config


def runtime_options(cfg: DictConfig) -> dict[str, bool]:
    """The `model.*` switches that change how networks run, not what they are (never stored in
    a checkpoint's backbone config): `activation_checkpointing` and `compile` (torch.compile)."""
    options = {}
    for key in ("activation_checkpointing", "compile"):
        value = cfg.model.get(key, False)
        if not isinstance(value, bool):
            raise UserError(f"model.{key} must be true or false, got {value!r}")
        options[key] = value
    return options


def rng_state() -> dict[str, Any]:
    """The global torch RNG (CPU, and CUDA where it is in use): it draws t, z_t, dropout, noise.

    CUDA: the generator of this process's device (`cuda_current`). With several processes only
    rank 0 writes checkpoints, and every rank's device generator holds the state of rank 0's
    (`rng.BatchShare`: all ranks make the same draws), so each rank restores it onto its own device."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_current"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Undo of `rng_state` (older checkpoints: one CUDA state per device index, set where present)."""
    torch.set_rng_state(state["cpu"])
    if not torch.cuda.is_available():
        return
    if "cuda_current" in state:
        torch.cuda.set_rng_state(state["cuda_current"], torch.cuda.current_device())
        return
    for index, device_state in enumerate(state.get("cuda", [])[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(device_state, index)


@contextmanager
def isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Global RNG seeded with `seed` inside the block, and exactly as before it after the block."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def algo_section(config: Mapping[str, Any]) -> dict:
    """The `algo` node of a composed config (DictConfig or plain dict) as a plain dict."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config.algo, resolve=True)
    return dict(config["algo"])


def build_settings(cls, algo: Mapping[str, Any], noun: str):
    """`cls(**algo)` for a settings dataclass, or a one-line UserError naming the first key `cls`
    lacks (e.g. noun "a bd3lm": "algo.x is not a bd3lm key; accepted: ...")."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(algo) - known)
    if unknown:
        raise UserError(f"algo.{unknown[0]} is not {noun} key; accepted: {', '.join(sorted(known))}")
    return cls(**dict(algo))


def process_meta(process, time_conditioning: bool) -> dict:
    """Checkpoint fields that let `Pipeline.from_checkpoint` rebuild a diffusion process."""
    return {**process.meta(), "time_conditioning": time_conditioning}


class AlgoBase(L.LightningModule):
    """Shared plumbing; subclasses set `self.backbone` (and `self.process` if diffusion)."""

    backbone_prefix = "backbone."  # the network `generate` samples from, as named in state_dict
    # state_dict prefixes that checkpoints leave out and `on_load_checkpoint` puts back
    # (distillation: the frozen teacher, reloaded from algo.teacher); resume checks skip them
    not_in_checkpoint: tuple[str, ...] = ()
    block_diffusion = False  # whether `block_size` < `model.length` is accepted (BD3-LM layouts)

    @classmethod
    def settings_from(cls, config: Mapping[str, Any]) -> Any:
        """The algo's checked settings from a composed config's `algo` node, without building a
        network or loading a teacher: mode=study checks its students with it before the teacher
        trains. None for algos without settings of their own."""
        return None

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
        self.save_hyperparameters({"config": config})
        self.cfg = OmegaConf.create(config)
        vocab = self.cfg.get("vocab")
        if vocab is None or vocab.get("size") is None:
            raise UserError("config has no vocab.size; build the algo through the CLI or set vocab.size")
        self.data_vocab_size = int(vocab.size)
        self.block_size()  # an algo without block diffusion refuses block_size < model.length here
        self.runtime = runtime_options(self.cfg)
        self.ema: EMA | None = None
        self._rng_to_restore: Mapping[str, Any] | None = None

    # -- networks ---------------------------------------------------------------------------
    def init_ema(self, module: torch.nn.Module) -> None:
        decay = float(self.cfg.training.get("ema", 0.0))
        self.ema = EMA(module, decay) if decay > 0 else None

    def batch_share(self) -> rng.BatchShare:
        """Where this process's training draws come from: its rows of draws made for the global
        batch (`rng.BatchShare`), so that they do not depend on the number of processes."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return rng.BatchShare()
        return rng.BatchShare(trainer.world_size, trainer.global_rank)

    def data_times(self, x: Tensor, blocks: int = 1, *, independent: bool = False) -> Tensor:
        """Diffusion times for a batch x [B, L] under `training.sampling_eps` / `antithetic_sampling`:
        [B], or one per (sequence, block) [B, blocks] (antithetic over all B · blocks, as BD3-LM).
        `independent`: a second draw for the same rows, independent of the first (see `time_uniforms`)."""
        u = self.time_uniforms(x, blocks, independent=independent)
        t = (1 - self.cfg.training.sampling_eps) * u + self.cfg.training.sampling_eps
        return t[:, 0] if blocks == 1 else t

    def time_uniforms(self, x: Tensor, blocks: int = 1, *, independent: bool = False) -> Tensor:
        """u ∈ [0, 1) per (sequence, block) [B, blocks], stratified over the global batch's
        B · blocks draws under `training.antithetic_sampling`, from this process's `batch_share`.
        Row i's stratum is i, so two draws for the same rows fall in the same stratum (|t − t'| <
        1/B); `independent` gives the rows' strata by a random permutation of the global batch,
        which keeps the stratification and makes the draw independent of an earlier one."""
        share, device = self.batch_share(), x.device
        u = rng.rand((x.shape[0], blocks), share, device=device)
        if self.cfg.training.antithetic_sampling:
            rows, total = rng.positions(x.shape[0], share, device, permuted=independent)
            index, total = rows[:, None] * blocks + torch.arange(blocks, device=device), total * blocks
            u = (u / total + index / total) % 1
        return u

    def block_size(self) -> int:
        """The top-level `block_size` (default `model.length`); an algo without block diffusion
        (`block_diffusion = False`) refuses any other value."""
        length = int(self.cfg.model.length)
        value = self.cfg.get("block_size")
        value = length if value is None else value
        if not self.block_diffusion and value != length:
            raise UserError(f"block_size={value} (model.length {length}) needs a block-diffusion algo such as "
                            f"algo=bd3lm; algo={self.cfg.algo.name} is not block diffusion")
        return check_block_size(value, length)

    def ema_module(self) -> torch.nn.Module:
        """The module whose weights the EMA tracks: the backbone (a distillation algo's generator or student)."""
        return self.backbone

    @contextmanager
    def evaluation_weights(self) -> Iterator[torch.nn.Module]:
        """The EMA module in eval mode for a block; live weights and mode restored after."""
        module = self.ema_module()
        was_training = module.training
        module.eval()
        try:
            with self.ema.swapped_in(module) if self.ema is not None else nullcontext():
                yield module
        finally:
            module.train(was_training)

    # -- training ---------------------------------------------------------------------------
    def loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(Σ per-token loss, number of tokens) for one batch; implemented by each algo."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        total, count = self.loss(batch)
        loss = total / self.mean_count(count).clamp_min(1)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def mean_count(self, count: Tensor) -> Tensor:
        """The mean over the processes of the tokens each counts (itself with one process): DDP
        averages the processes' gradients, so dividing each one's sum by this mean makes the
        loss the global sum over the global count, as one process with the whole batch has it,
        even where the counts differ (padding, masked tokens). One all-reduce, no host sync."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return count
        return trainer.strategy.reduce(count.to(torch.float32), reduce_op="mean")

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: that hook runs after the checkpoint callbacks (whose
        # file would miss this step's update) and after every micro-batch of an accumulation.
        # Manual-optimisation algos never reach this hook and update their EMA themselves.
        if self.ema is not None:
            self.ema.update(self.ema_module())

    def configure_model(self):
        """Under `trainer.strategy=fsdp` (Lightning's device mesh exists) shard every DiT."""
        if self.device_mesh is not None:
            from mdlm_dmmd.sharding import shard_networks

            shard_networks(self, self.device_mesh["data_parallel"])

    def on_fit_start(self):
        """`model.activation_checkpointing` and `model.compile` on every DiT of the algo; compiled
        in place (`nn.Module.compile`), so state_dict keys, EMA and checkpoints are unchanged."""
        for module in self.modules():
            if isinstance(module, DiT):
                module.activation_checkpointing = self.runtime["activation_checkpointing"]
                if self.runtime["compile"]:
                    module.compile()

    def on_train_start(self):
        # Here and not in on_load_checkpoint: Lightning seeds and builds everything before this
        # point, and loading a checkpoint outside `fit` should not move the caller's RNG.
        if self._rng_to_restore is not None:
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        else:
            # A fresh run's draws start from the seed, whatever the setup drew before (it draws
            # differently with one process and with several), so that with `batch_share` a
            # multi-process run draws what a one-process run of the same global batch draws.
            # seed + 1: validation draws from the seed itself (`isolated_rng`), and training's
            # first batch should not reuse validation's first t and masks.
            torch.manual_seed(int(self.cfg.get("seed", 0) or 0) + 1)

    def on_validation_epoch_start(self):
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_weights = self.evaluation_weights()
        self._val_weights.__enter__()
        # Every validation draws the same t and z_t (seed = the run's seed), from an RNG of its
        # own: validating neither moves the training noise nor depends on where training is, so
        # a resumed run (which skips the validation it resumed after) stays identical.
        self._val_rng = isolated_rng(int(self.cfg.get("seed", 0) or 0), self.device)
        self._val_rng.__enter__()

    def validation_step(self, batch, batch_idx):
        total, count = self.loss(batch)
        self._val_sum += total.double()
        self._val_count += count.double()

    def on_validation_epoch_end(self):
        self._val_rng.__exit__(None, None, None)
        self._val_weights.__exit__(None, None, None)
        nll = self.validation_nll()
        self.log("val/nll", nll, prog_bar=True)  # the same on every process: no averaging of per-process values
        self.log("val/ppl", torch.exp(nll.clamp(max=50)))

    def validation_nll(self) -> Tensor:
        """The validation NELBO per token over every process's tokens: the sums and counts are
        reduced before the division (an average of per-process ratios, or of their exp, would
        weigh a process with fewer tokens as much as one with more). float32 scalar."""
        both = torch.stack([self._val_sum, self._val_count])
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            both = trainer.strategy.reduce(both, reduce_op="sum")  # one all-reduce for the two
        total, count = both
        return (total / count.clamp_min(1)).float()

    def configure_optimizers(self):
        return self.build_optimizer(self.ema_module().parameters(), self.cfg.optim)

    def build_optimizer(self, params, optim: DictConfig, lr: float | None = None) -> dict:
        """AdamW with linear warmup to a constant rate; `lr` overrides `optim.lr` (distillation
        gives each network its own rate). Update k (from 0) takes lr · min(1, (k + 1)/(W + 1)):
        MDLM/Duo's `constant_warmup` takes k/W, whose first update has rate 0; both reach lr at
        update W. Fused (one kernel for all parameters) when they are on CUDA; the default
        implementation elsewhere."""
        params = list(params)
        tensors = [t for group in params for t in (group["params"] if isinstance(group, dict) else [group])]
        opt = torch.optim.AdamW(
            params,
            lr=optim.lr if lr is None else lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            fused=bool(tensors) and all(t.is_cuda for t in tensors) or None,
        )
        warmup = max(int(optim.warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "trainer/lr"}}

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict:
        """What `load_backbone` needs to rebuild the sampling network without this class."""
        return {
            "backbone_prefix": self.backbone_prefix,
            "backbone_config": dit_config_to_public(self.backbone.config),
            "algo": self.cfg.algo.name,
            "vocab": OmegaConf.to_container(self.cfg.vocab),
            "data": OmegaConf.to_container(self.cfg.data),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mdlm_dmmd"] = CheckpointMeta.from_dict(self.checkpoint_meta()).to_dict()  # typed, versioned
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        # A resumed run is re-seeded from the config; the RNG as it was at this step makes its
        # next steps draw what the uninterrupted run draws (the data order is the train loader's
        # state, which Lightning stores itself).
        checkpoint["rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
        self._rng_to_restore = checkpoint.get("rng")  # set in on_train_start

    # -- sampling ---------------------------------------------------------------------------
    def denoiser(self, network: torch.nn.Module):
        """`network` as a `Denoiser` (or `CausalDenoiser`): the one way losses and samplers call it."""
        raise NotImplementedError

    def sampler(self):
        """The sampler of this algo's sampled network (`diffusion.sampling`)."""
        raise NotImplementedError

    def pipeline(self, network: torch.nn.Module) -> Pipeline:
        """The sampling pipeline around `network` (an evaluation copy of the sampled network)."""
        return Pipeline(self.denoiser(network), self.sampler(), CheckpointMeta.from_dict(self.checkpoint_meta()))

    def generate(self, num_samples: int, **options) -> Tensor:
        """[num_samples, L] token ids from the EMA weights in eval mode; `options` as
        `Pipeline.generate` (steps, generator, temperature, top_p, prompts, ...)."""
        with self.evaluation_weights() as network:
            return self.pipeline(network).generate(num_samples, **options)

    @property
    def length(self) -> int:
        return self.backbone.config.length
