"""The host modes on a composed config: train, sample, eval (study and sweep live in `eval/`).

Everything a run writes goes under `run_dir`: `config.yaml`, `checkpoints/` (periodic, `last`,
and `crash.ckpt` if training dies), `samples.pt` with `samples.png` (images) or `samples.txt`
(text), `metrics.json` and a short `report.md`. Inputs are validated and the algo is built before
the folder is created, so a wrong input leaves nothing half-written.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mdlm_dmmd import registry
from mdlm_dmmd.algos.base import AlgoBase
from mdlm_dmmd.errors import UserError


DEFAULT_STEPS = 128


def dispatch(cfg: DictConfig) -> None:
    if cfg.mode == "study":
        from mdlm_dmmd.eval.study import run_study

        run_study(cfg)
        return
    if cfg.mode == "sweep":
        from mdlm_dmmd.eval.sweep import run_sweep

        run_sweep(cfg)
        return
    {"train": train, "sample": sample, "eval": evaluate}[cfg.mode](cfg)


# -- shared pieces -------------------------------------------------------------------------
def vocab_info(data) -> dict:
    """What algos need to know about the data's token space (stored in every checkpoint)."""
    return {
        "size": data.vocab_size,
        "bos_id": data.bos_id,
        "eos_id": data.eos_id,
        "modality": data.modality,
        "image_shape": list(data.image_shape) if data.image_shape else None,
    }


def make_run_dir(cfg: DictConfig) -> Path:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    return run_dir


def existing_checkpoint(cfg: DictConfig, *, required: bool) -> str | None:
    path = cfg.get("checkpoint")
    if path is None:
        if required:
            raise UserError(f"mode={cfg.mode} needs checkpoint=PATH (a .ckpt file or an exported directory)")
        return None
    if not Path(path).exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    return str(path)


def check_resume(path: str, algo: L.LightningModule) -> None:
    """A resume checkpoint must be a Lightning .ckpt whose weights fit `algo`; checked before the
    run folder exists, since Lightning would only fail inside `fit`, with a traceback."""
    from mdlm_dmmd.checkpoints import _torch_load

    if Path(path).is_dir():
        raise UserError(f"checkpoint '{path}': resuming training needs a .ckpt written by mdlm-dmmd, not a directory")
    ckpt = _torch_load(Path(path))
    state = ckpt["state_dict"]
    recorded = ckpt.get("mdlm_dmmd") or {}
    current = algo.checkpoint_meta() if isinstance(algo, AlgoBase) else {}  # third-party modules: no meta
    for key in ("algo", "process", "schedule", "schedule_eps", "schedule_gamma_min", "schedule_gamma_max",
                "schedule_num_points", "schedule_vocab_size"):
        if key in recorded and key in current and recorded[key] != current[key]:
            raise UserError(f"checkpoint '{path}' was trained with {key}={recorded[key]!r} but this config has "
                            f"{key}={current[key]!r}; resume with the config it was trained with")
    left_out = tuple(getattr(algo, "not_in_checkpoint", ()))  # put back by the algo on load
    expected = {k: v for k, v in algo.state_dict().items() if not k.startswith(left_out)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
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
        return loggers.TensorBoardLogger(save_dir=str(run_dir), name="logs", version="")
    if kind == "wandb":
        if importlib.util.find_spec("wandb") is None:
            raise UserError("logger=wandb needs wandb: pip install 'mdlm-dmmd[wandb]' torch==2.13.0 (or use logger=csv)")
        return loggers.WandbLogger(save_dir=str(run_dir), project="mdlm-dmmd", config=OmegaConf.to_container(cfg))
    raise UserError(f"logger must be one of csv, tensorboard, wandb, none; got '{kind}'")


class SaveOnCrash(L.Callback):
    """Write `checkpoints/crash.ckpt` when training raises (including Ctrl-C): nothing is lost."""

    def __init__(self, directory: Path):
        self.directory = directory

    def on_exception(self, trainer, pl_module, exception):
        self.directory.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(self.directory / "crash.ckpt"))


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
        ),
        SaveOnCrash(ckpt_dir),
    ]
    logger = build_logger(cfg, run_dir)
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if not algo.automatic_optimization:
        # Manual-optimisation algos (distillation) read both keys from the config and do the
        # accumulation and clipping themselves; Lightning refuses them with manual optimisation.
        kwargs.pop("accumulate_grad_batches", None)
        kwargs.pop("gradient_clip_val", None)
    try:
        return L.Trainer(**kwargs, default_root_dir=str(run_dir), callbacks=callbacks, logger=logger)
    except (TypeError, ValueError) as err:  # Lightning's own messages name the argument
        raise UserError(f"bad trainer config: {err}") from err


def default_device(cfg: DictConfig | None = None) -> str:
    """Where loaded checkpoints sample (`sampling.device`): auto = the GPU when there is one.

    Random streams differ between devices, so the same seed gives other samples on a GPU than
    on the CPU; `sampling.device=cpu` reproduces CPU samples on a GPU machine.
    """
    value = str((cfg.sampling.get("device") if cfg is not None else None) or "auto")
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise UserError(f"sampling.device must be auto, cpu, cuda or cuda:N; got {value!r}")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"sampling.device={value} but torch sees no CUDA device; use sampling.device=auto or cpu")
    return value


def sampling_steps(cfg: DictConfig, meta: dict | None = None) -> int:
    """`sampling.steps`, or when null the checkpoint's own k (a D-MMD student), else 128."""
    if cfg.sampling.steps is not None:
        return int(cfg.sampling.steps)
    return int((meta or {}).get("sampling_steps") or DEFAULT_STEPS)


def held_out_rows(cfg: DictConfig, length: int, count: int) -> torch.Tensor:
    """Up to `count` validation rows [N, L], drawn at random with `sampling.seed`."""
    from mdlm_dmmd.data import build_data

    valid = build_data(cfg.data, length).valid
    index = torch.randperm(len(valid), generator=torch.Generator().manual_seed(int(cfg.sampling.seed)))[:count]
    return torch.stack([valid[int(i)]["input_ids"] for i in index])


def prompt_length(cfg: DictConfig, length: int) -> int:
    value = cfg.sampling.get("prompt_length") or 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < length:
        raise UserError(f"sampling.prompt_length must be an int in [0, {length}) (model length {length}), got {value!r}")
    return value


def prompt_rows(cfg: DictConfig, length: int) -> torch.Tensor | None:
    """The held-out rows [num_samples, L] whose first `sampling.prompt_length` tokens prompt the
    samples (row i prompts sample i), or None for unconditional sampling."""
    if prompt_length(cfg, length) == 0:
        return None
    count = int(cfg.sampling.num_samples)
    rows = held_out_rows(cfg, length, count)
    if len(rows) < count:
        raise UserError(f"sampling.prompt_length needs one held-out row per sample: {count} samples "
                        f"but data={cfg.data.name} has {len(rows)} validation rows")
    return rows


def generate(pipeline_or_algo, cfg: DictConfig, steps: int, *, prompt_rows: torch.Tensor | None = None,
             progress: bool = True) -> torch.Tensor:
    """`sampling.num_samples` sequences in `steps` steps, seeded with `sampling.seed`; with
    `prompt_rows` (see `prompt_rows`), sample i continues the first `sampling.prompt_length`
    tokens of row i."""
    s = cfg.sampling
    prompts = None if prompt_rows is None else prompt_rows[:, : int(s.prompt_length)]
    # The generator must live where the samples are drawn (a CPU generator cannot feed CUDA draws).
    generator = torch.Generator(device=pipeline_or_algo.device).manual_seed(int(s.seed))
    return pipeline_or_algo.generate(
        int(s.num_samples), steps=steps, generator=generator, temperature=float(s.temperature),
        top_p=float(s.top_p), noise_removal=str(s.noise_removal), batch_size=int(s.batch_size), progress=progress,
        prompts=prompts,
    )


def compute_metrics(cfg: DictConfig, samples: torch.Tensor, *, prompt_rows: torch.Tensor | None = None) -> dict[str, Any]:
    """`eval.metrics` of `samples`. With the `prompt_rows` the samples continue, metrics that
    take them (gradient_moment: conditional GM, paper §5) compare with those rows; the others
    score the whole sequences."""
    results = {}
    options = cfg.eval.get("metric_options") or {}
    for name in cfg.eval.get("metrics", []) or []:
        extra = OmegaConf.to_container(options[name], resolve=True) if name in options else {}
        metric = registry.load_metric(name)
        if prompt_rows is not None and "prompt_rows" in inspect.signature(metric).parameters:
            extra.update(prompt_rows=prompt_rows, prompt_length=int(cfg.sampling.prompt_length))
        value = metric(samples, data_config=cfg.data, **extra)
        results[name] = {k: v for k, v in value.items() if k != "per_sample"}
    return results


def write_samples(run_dir: Path, samples: torch.Tensor, data) -> list[str]:
    """samples.pt, plus a picture (images) or the decoded text; returns the file names written."""
    torch.save(samples.cpu(), run_dir / "samples.pt")
    if data.modality == "image":
        from mdlm_dmmd.data.images import save_image_grid

        # the first 64 as a picture (all of them are in samples.pt)
        save_image_grid(samples[:64].cpu(), run_dir / "samples.png", max_value=data.vocab_size - 1)
        return ["samples.pt", "samples.png"]
    (run_dir / "samples.txt").write_text("\n\n=====\n\n".join(data.decode(samples.cpu())), encoding="utf-8")
    return ["samples.pt", "samples.txt"]


def log_samples(logger, samples: torch.Tensor, data, step: int) -> None:
    """Samples into W&B next to the run's curves: a table of texts, or a picture of images."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return  # CSV/TensorBoard: the samples files in run_dir are the record
    if data.modality == "image":
        from mdlm_dmmd.data.images import image_grid

        logger.log_image("samples", images=[image_grid(samples.cpu(), max_value=data.vocab_size - 1, scale=4)], step=step)
    else:
        logger.log_text("samples", columns=["sample"], data=[[text] for text in data.decode(samples.cpu())], step=step)


def write_report(run_dir: Path, title: str, rows: dict[str, Any], files: list[str]) -> None:
    lines = [f"# {title}", "", "| quantity | value |", "|---|---|"]
    for key, value in rows.items():
        if isinstance(value, dict) and "value" in value:
            value = f"{value['value']:.4f} ± {value['stderr']:.4f}"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"| {key} | {value} |")
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in files), ""]
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    (run_dir / "metrics.json").write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")


# -- modes -------------------------------------------------------------------------------
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
    from mdlm_dmmd.data import build_data, make_loaders

    resume = existing_checkpoint(cfg, required=False)
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
    trainer.fit(algo, train_loader, valid_loader, ckpt_path=resume)
    if trainer.interrupted:
        return None
    checkpoint = run_dir / "checkpoints" / "final.ckpt"
    trainer.save_checkpoint(str(checkpoint), weights_only=False)
    return Fitted(run_dir, checkpoint, algo, data, trainer, (time.time() - started) / 60)


def train(cfg: DictConfig) -> None:
    fitted = fit(cfg)
    if fitted is None:
        return
    rows: dict[str, Any] = {"algo": cfg.algo.name, "data": cfg.data.name,
                            "optimizer steps": fitted.trainer.global_step, "train minutes": fitted.minutes}
    rows.update({k: float(v) for k, v in fitted.trainer.callback_metrics.items() if k.startswith("val/")})
    files = ["checkpoints/final.ckpt"]
    if int(cfg.sampling.num_samples) > 0:
        rows["sampling steps"] = sampling_steps(cfg, fitted.algo.checkpoint_meta())
        prompts = prompt_rows(cfg, fitted.algo.length)
        samples = generate(fitted.algo, cfg, rows["sampling steps"], prompt_rows=prompts)
        rows.update(compute_metrics(cfg, samples, prompt_rows=prompts))
        files += write_samples(fitted.run_dir, samples, fitted.data)
        log_samples(fitted.trainer.logger, samples, fitted.data, fitted.trainer.global_step)
    write_report(fitted.run_dir, f"{cfg.algo.name} on {cfg.data.name}", rows, files)
    print(f"run written to {fitted.run_dir}")


def _load_pipeline(cfg: DictConfig):
    from mdlm_dmmd.pipeline import Pipeline

    path = existing_checkpoint(cfg, required=True)
    return Pipeline.from_checkpoint(path, device=default_device(cfg)), path


def _write_pipeline_samples(cfg: DictConfig, pipeline, samples: torch.Tensor) -> tuple[Path, list[str]]:
    """Samples of a loaded checkpoint, decoded with the data config stored in it (if any)."""
    from mdlm_dmmd.data import build_data

    data = build_data(pipeline.meta.get("data") or cfg.data, samples.shape[1])
    run_dir = make_run_dir(cfg)
    return run_dir, write_samples(run_dir, samples, data)


def sample(cfg: DictConfig) -> None:
    pipeline, _ = _load_pipeline(cfg)
    samples = generate(pipeline, cfg, sampling_steps(cfg, pipeline.meta), prompt_rows=prompt_rows(cfg, pipeline.length))
    run_dir, files = _write_pipeline_samples(cfg, pipeline, samples)
    print(f"{len(samples)} samples written to {run_dir} ({', '.join(files)})")


def evaluate(cfg: DictConfig) -> None:
    pipeline, path = _load_pipeline(cfg)
    steps = sampling_steps(cfg, pipeline.meta)
    prompts = prompt_rows(cfg, pipeline.length)
    samples = generate(pipeline, cfg, steps, prompt_rows=prompts)
    rows = {"checkpoint": path, "sampling steps": steps, "samples": len(samples)}
    if prompts is not None:
        rows["prompt length"] = int(cfg.sampling.prompt_length)
    rows.update(compute_metrics(cfg, samples, prompt_rows=prompts))
    run_dir, files = _write_pipeline_samples(cfg, pipeline, samples)
    write_report(run_dir, f"evaluation of {path}", rows, files)
    print(json.dumps(rows, indent=2, default=str))
