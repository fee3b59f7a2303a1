"""Lightning glue: the trainer, its loggers and callbacks, the run folder, and `fit`, which trains
`cfg.algo` on `cfg.data` (mode=train, and a study's teacher and students).

Everything is checked and built before the run folder is created, so a wrong input leaves
nothing half-written: the algo (it validates its own config), a resume checkpoint against it,
the loaders, then the trainer and logger. The RNG save/restore that makes a resumed run
identical to one that never stopped belongs to the algo (`algos/base.py`).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mdlm_dmmd import ranks, registry
from mdlm_dmmd.algos.base import AlgoBase
from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.checkpoints import _torch_load
from mdlm_dmmd.data import DataBundle, build_data, make_loaders
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.models.shards import is_sharded
from mdlm_dmmd.preemption import SaveOnCrash, StopOnSigterm


def vocab_info(data: DataBundle) -> dict:
    """What algos need to know about the data's token space (stored in every checkpoint)."""
    return {
        "size": data.vocab_size,
        "bos_id": data.bos_id,
        "eos_id": data.eos_id,
        "modality": data.modality,
        "image_shape": list(data.image_shape) if data.image_shape else None,
    }


def check_run_dir(cfg: DictConfig) -> None:
    """Refuse, before any work, a `run_dir` that could not be created: the nearest existing
    folder on its path must be a writable directory (nothing is created here)."""
    run_dir = Path(cfg.run_dir)
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())
    problem = None if existing.is_dir() else f"{existing} is not a directory"
    if problem is None and not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise UserError(f"run_dir '{run_dir}' cannot be written: {problem}; choose another run_dir=PATH")


def make_run_dir(cfg: DictConfig) -> Path:
    """`run_dir`, created, with the resolved config saved as `config.yaml` (by rank 0 only, in
    a multi-process run: every launched process runs this before training)."""
    from lightning.pytorch.utilities import rank_zero_only

    run_dir = Path(cfg.run_dir)
    if rank_zero_only.rank != 0:
        return run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    except OSError as err:  # no permission, a file in the way, a full or read-only disk
        raise UserError(f"run_dir '{run_dir}' cannot be written: {err.strerror or err}; "
                        f"choose another run_dir=PATH") from err
    return run_dir


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """`checkpoint=PATH` to resume from (None: a fresh run); it must exist."""
    path = cfg.get("checkpoint")
    if path is not None and not Path(path).exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    return None if path is None else str(path)


# what a resumed run must share with its checkpoint (when both record it): the process, schedule
# and what defines the network's inputs and outputs; a round-dependent key (SDTT's current k) is
# not here, the algo checks its own (`check_resume_meta`)
RESUME_META_KEYS = ("algo", "process", "schedule", "schedule_eps", "schedule_gamma_min", "schedule_gamma_max",
                    "schedule_num_points", "schedule_vocab_size", "time_conditioning", "block_size", "mask_id",
                    "vocab_size", "start_id", "cross_attn", "noise_dim", "loss", "teacher_top_p",
                    "teacher_temperature")


def check_resume(path: str, algo: L.LightningModule) -> None:
    """A resume checkpoint must be a Lightning .ckpt whose weights fit `algo`; checked before the
    run folder exists, since Lightning would only fail inside `fit`, with a traceback.

    An algo with more to check in the recorded metadata than the keys compared here (e.g. that a
    moved teacher is still the same file) defines `check_resume_meta(recorded, path)`, which
    raises UserError; it runs before the weights are compared, whose mismatch it would explain."""
    if Path(path).is_dir():
        raise UserError(f"checkpoint '{path}': resuming training needs a .ckpt written by mdlm-dmmd, not a directory")
    ckpt = _torch_load(Path(path))
    state = ckpt["state_dict"]
    typed = CheckpointMeta.from_dict(ckpt.get("mdlm_dmmd") or {}, source=f"checkpoint '{path}'")  # newer: refused
    recorded = typed.to_dict()
    current = algo.checkpoint_meta() if isinstance(algo, AlgoBase) else {}  # third-party modules: no meta
    for key in RESUME_META_KEYS:
        if key in recorded and key in current and recorded[key] != current[key]:
            raise UserError(f"checkpoint '{path}' was trained with {key}={recorded[key]!r} but this config has "
                            f"{key}={current[key]!r}; resume with the config it was trained with")
    hook = getattr(algo, "check_resume_meta", None)
    if callable(hook):
        hook(typed, path)
    left_out = tuple(getattr(algo, "not_in_checkpoint", ()))  # put back by the algo on load
    expected = {k: v for k, v in algo.state_dict().items() if not k.startswith(left_out)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not k.startswith(left_out)]  # e.g. a swapped teacher
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                 else f"shape of {shapes[0]}: checkpoint {tuple(state[shapes[0]].shape)} vs model {tuple(expected[shapes[0]].shape)}")
        raise UserError(f"checkpoint '{path}' does not fit this config ({first}); resume with the config it was trained with")


def build_logger(cfg: DictConfig, run_dir: Path):
    kind = cfg.get("logger", "csv")
    if kind in (None, "none", False):
        return False
    from lightning.pytorch import loggers

    if kind == "csv":
        return loggers.CSVLogger(save_dir=str(run_dir), name="logs", version="")
    if kind == "tensorboard":
        if not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
            raise UserError("logger=tensorboard needs tensorboard: pip install tensorboard (or use logger=csv)")
        return loggers.TensorBoardLogger(save_dir=str(run_dir), name="logs", version="")
    if kind == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise UserError("logger=wandb needs wandb: pip install 'mdlm-dmmd[wandb]' torch==2.13.0 (or use logger=csv)")
        return loggers.WandbLogger(save_dir=str(run_dir), project="mdlm-dmmd", config=OmegaConf.to_container(cfg))
    raise UserError(f"logger must be one of csv, tensorboard, wandb, none; got '{kind}'")


SIMPLE_TYPES = {int: "an int", float: "a float", bool: "true or false", str: "a string", type(None): None}


def check_trainer_types(trainer: dict) -> None:
    """`trainer.*` values against the types `lightning.Trainer` declares for them, where those are
    plain numbers, booleans or strings; Lightning itself would fail later, naming neither the key
    nor the type (e.g. "'<' not supported between instances of 'str' and 'int'")."""
    hints = typing.get_type_hints(L.Trainer.__init__)
    for key, value in trainer.items():
        hint = hints.get(key)
        accepted = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        if hint is None or not all(t in SIMPLE_TYPES for t in accepted):
            continue  # richer types (Literal, objects, lists): Lightning's own message names them
        numbers = float in accepted and isinstance(value, int)  # an int is a float here
        if isinstance(value, bool) and bool not in accepted or not (numbers or isinstance(value, accepted)):
            kinds = " or ".join(SIMPLE_TYPES[t] for t in accepted if SIMPLE_TYPES[t])
            null = " (or null)" if type(None) in accepted else ""
            raise UserError(f"trainer.{key} must be {kinds}{null}, got {value!r}")


def build_trainer(cfg: DictConfig, run_dir: Path, algo: L.LightningModule) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dir = run_dir / "checkpoints"
    every = cfg.trainer.get("val_check_interval")
    callbacks = [
        ModelCheckpoint(
            dirpath=str(ckpt_dir),
            filename="step{step}",
            auto_insert_metric_name=False,
            save_last=True,
            save_top_k=-1,
            every_n_train_steps=every if isinstance(every, int) else None,
            # Resuming in a moved run folder, Lightning does not know the last.ckpt there as its own
            # and would write last-v1.ckpt beside it: last.ckpt must always be the latest state.
            enable_version_counter=False,
        ),
        StopOnSigterm(),
        SaveOnCrash(ckpt_dir),
    ]
    logger = build_logger(cfg, run_dir)
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    check_trainer_types(kwargs)
    if not algo.automatic_optimization:
        if str(kwargs.get("precision")) in ("16-mixed", "16"):
            # fp16 loss scaling needs the scaler to see every step's gradients; the alternation
            # skips non-finite updates itself and clips unscaled gradients
            raise UserError(f"trainer.precision={kwargs['precision']} (fp16 loss scaling) is not supported by "
                            f"algo={cfg.algo.name}; use bf16-mixed or 32-true")
        # Manual-optimisation algos (distillation) read both keys from the config and do the
        # accumulation and clipping themselves; Lightning refuses them with manual optimisation.
        kwargs.pop("accumulate_grad_batches", None)
        kwargs.pop("gradient_clip_val", None)
    if kwargs.get("strategy") == "fsdp":
        from lightning.pytorch.utilities.model_helpers import is_overridden

        from mdlm_dmmd.sharding import FullyShardedStrategy

        if not is_overridden("configure_model", algo):  # Lightning would fail inside fit, with a traceback
            raise UserError(f"trainer.strategy=fsdp needs an algo that shards its networks in configure_model "
                            f"(AlgoBase does); algo={cfg.algo.name} does not: use trainer.strategy=ddp")
        kwargs["strategy"] = FullyShardedStrategy()  # FSDP2 on any device (Lightning's "fsdp" is FSDP1, GPUs only)
    check_accelerator(str(kwargs.get("accelerator", "auto")))
    try:
        return L.Trainer(**kwargs, default_root_dir=str(run_dir), callbacks=callbacks, logger=logger)
    except (TypeError, ValueError, MisconfigurationException) as err:  # Lightning's own messages name the argument
        raise UserError(f"bad trainer config: {err}") from err
    except ImportError as err:  # an accelerator, strategy or precision whose package is missing
        raise UserError(f"bad trainer config (a package it needs is missing): {err}") from err


def check_accelerator(accelerator: str) -> None:
    """A GPU accelerator on a machine where torch sees none (a GPU config, or the SLURM script's
    default, run on a CPU machine): one line naming the key, where Lightning's says "No supported
    gpu backend found!"."""
    mps = getattr(torch.backends, "mps", None)
    if accelerator == "cuda" or accelerator == "gpu" and not (mps and mps.is_available()):
        if not torch.cuda.is_available():
            raise UserError(f"trainer.accelerator={accelerator} but torch sees no CUDA device; "
                            f"use trainer.accelerator=cpu (or auto)")


@dataclass
class Fitted:
    """What a finished training run leaves behind, for recipes that chain runs."""

    run_dir: Path
    checkpoint: Path
    algo: L.LightningModule
    data: Any
    trainer: L.Trainer
    minutes: float


def fit(cfg: DictConfig) -> Fitted | None:
    """Train `cfg.algo` on `cfg.data`; None if training was interrupted (crash.ckpt is saved)."""
    resume = resume_checkpoint(cfg)
    check_run_dir(cfg)  # before building anything: Lightning logs as soon as its trainer exists
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    algo_cls = registry.load_algo(cfg.algo.name)
    data = build_data(cfg.data, cfg.model.length, seed=int(cfg.seed))
    config = OmegaConf.to_container(cfg, resolve=True)
    config["vocab"] = vocab_info(data)
    algo = algo_cls(config)
    if resume is not None:
        check_resume(resume, algo)
    train_loader, valid_loader = make_loaders(
        data, batch_size=cfg.loader.batch_size, eval_batch_size=cfg.loader.eval_batch_size,
        num_workers=cfg.loader.num_workers, seed=int(cfg.seed),
    )
    # The trainer (and logger) may still refuse their arguments: build them before writing.
    trainer = build_trainer(cfg, Path(cfg.run_dir), algo)
    run_dir = make_run_dir(cfg)
    started = time.time()
    try:
        trainer.fit(algo, train_loader, valid_loader, ckpt_path=resume)
    except SIGTERMException:
        # A cluster's preemption or time limit. Lightning has saved crash.ckpt (`SaveOnCrash`) and
        # would exit with status 0, which a chain of jobs (SLURM's afterok) reads as a finished run.
        folder = run_dir / "checkpoints"
        saved = folder / "crash.ckpt" if (folder / "crash.ckpt").is_file() else folder / "last.ckpt"
        print(f"rank {trainer.global_rank}: training stopped by SIGTERM; resume with checkpoint={saved}",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM) from None
    if trainer.interrupted:
        return None
    check_ranks_agree(algo)
    checkpoint = run_dir / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(str(checkpoint), weights_only=False)  # collective; rank 0 writes
    if algo.device_mesh is not None and trainer.global_rank == 0:
        # FSDP: a sharded network runs only with every process; rank 0 samples alone, from whole weights
        algo = unsharded(algo_cls, config, checkpoint).to(trainer.strategy.root_device)
    return Fitted(run_dir, checkpoint, algo, data, trainer, (time.time() - started) / 60)


def unsharded(algo_cls, config: dict, checkpoint: Path) -> L.LightningModule:
    """A fresh `algo_cls` holding the weights and EMA of `checkpoint`, restored as Lightning restores
    a resumed run (the algo's `on_load_checkpoint` first: it puts back what checkpoints leave out)."""
    algo = algo_cls(config)
    state = _torch_load(checkpoint)
    algo.on_load_checkpoint(state)
    algo.load_state_dict(state["state_dict"])
    return algo


def check_ranks_agree(algo: L.LightningModule) -> None:
    """In a multi-process run, every rank must end training with the same weights and EMA (data
    parallelism keeps replicas equal; an alternation or EMA that drifted would not): compare one
    float64 checksum per tensor across the ranks, and stop with an error if they differ. Under
    FSDP only the tensors that are not sharded (buffers) have replicas to compare."""
    _, world = ranks.current()
    if world == 1:
        return
    from mdlm_dmmd.models.ema import EMA

    tensors = [t for t in algo.state_dict().values() if torch.is_tensor(t) and t.is_floating_point()]
    for ema in (v for v in vars(algo).values() if isinstance(v, EMA)):  # the EMA, IDLM's fake_ema, ...
        tensors += list(ema.shadow.values())
    tensors = [t for t in tensors if not is_sharded(t)]  # FSDP: shards differ by design; buffers are replicas
    if not tensors:
        return
    sums = torch.stack([t.detach().double().sum() for t in tensors]).to(algo.device).view(torch.int64)  # bits: NaN = NaN
    gathered = [torch.empty_like(sums) for _ in range(world)]
    torch.distributed.all_gather(gathered, sums)
    if any(not torch.equal(g, gathered[0]) for g in gathered[1:]):
        raise RuntimeError("data-parallel ranks ended training with different weights; please report this as a bug")
