"""Sample a model and score the samples: the one job behind mode=train's samples, mode=sample,
mode=eval, every row of a study and every row of a sweep.

A "model" here is anything with `generate(num_samples, steps=..., generator=..., ...)`,
`device` and `length`: a `Pipeline` loaded from a checkpoint, or a freshly trained algo. What
is sampled comes from the `sampling` node of the config (a recipe that samples several ways,
such as a sweep, merges its values into a copy), what is computed from `eval.metrics` and
`eval.metric_options`.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mdlm_dmmd import registry
from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.data import DataBundle, build_data
from mdlm_dmmd.diffusion.sampling import network_calls
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.pipeline import Pipeline
from mdlm_dmmd.ranks import Ranks, launched, local_device

DEFAULT_STEPS = 128
logger = logging.getLogger(__name__)


def default_device(cfg: DictConfig | None = None) -> str:
    """Where loaded checkpoints sample (`sampling.device`): auto = the GPU when there is one.

    Random streams differ between devices, so the same seed gives other samples on a GPU than
    on the CPU; `sampling.device=cpu` reproduces CPU samples on a GPU machine.
    """
    value = str((cfg.sampling.get("device") if cfg is not None else None) or "auto")
    if value == "auto":  # several processes (torchrun): each its own GPU, cuda:LOCAL_RANK
        return local_device("cuda") if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise UserError(f"sampling.device must be auto, cpu, cuda or cuda:N; got {value!r}")
    if value.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"sampling.device={value} but torch sees no CUDA device; use sampling.device=auto or cpu")
    if value.startswith("cuda:") and launched() > 1:
        raise UserError(f"sampling.device={value} would put all {launched()} processes on one GPU; use "
                        f"sampling.device=cuda (or auto): each process takes cuda:LOCAL_RANK")
    return local_device(value)


def load_pipeline(cfg: DictConfig) -> tuple[Pipeline, str]:
    """(pipeline, path) of `checkpoint=PATH`, on `sampling.device` (mode=sample and eval)."""
    path = cfg.get("checkpoint")
    if path is None:
        raise UserError(f"mode={cfg.mode} needs checkpoint=PATH (a .ckpt file or an exported directory)")
    if not Path(path).exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    pipeline = Pipeline.from_checkpoint(str(path), device=default_device(cfg))
    check_block_size(cfg, pipeline, str(path))
    return pipeline, str(path)


def with_checkpoint_data(cfg: DictConfig, meta: CheckpointMeta) -> DictConfig:
    """`cfg` with `data` the data a loaded checkpoint was trained on when `data_from=checkpoint`
    (the CLI's resolution of `auto` when no data was chosen) and the checkpoint stores it (public
    ones do not): what its prompts and metrics read. Otherwise `cfg` itself."""
    if cfg.get("data_from") != "checkpoint":
        return cfg
    chosen = cfg.copy()
    if meta.data:
        chosen.data = OmegaConf.create(meta.data)
    else:  # what the report and the run's config.yaml then say
        logger.warning("the checkpoint stores no data config: prompts and metrics read data=%s", cfg.data.get("name"))
        chosen.data_from = "config"
    return chosen


def data_row(cfg: DictConfig) -> str:
    """The report's line on what the metrics and prompts read."""
    source = "the checkpoint's" if cfg.get("data_from") == "checkpoint" else "data="
    return f"{cfg.data.get('name')} ({source})"


def check_block_size(cfg: DictConfig, pipeline: Pipeline, path: str) -> None:
    """A `block_size` given (not null) must be the checkpoint's: a block model samples only with
    the block size it was trained with, a plain one only as plain diffusion (= its length)."""
    asked = cfg.get("block_size")
    if asked is None:
        return
    own = pipeline.block_size
    if asked != (own if own is not None else pipeline.length):
        have = (f"block_size={own}" if own is not None else "no block size (an autoregressive model)"
                if pipeline.is_autoregressive else "no block size (plain diffusion)")
        raise UserError(f"block_size={asked} but checkpoint '{path}' has {have}; leave block_size out to sample "
                        "it as trained")


def checkpoint_data(cfg: DictConfig, meta: CheckpointMeta, length: int) -> DataBundle:
    """The data a loaded checkpoint was trained on (its stored data config), else `cfg.data`:
    its samples decode right even when the command line names other data."""
    return build_data(meta.data or cfg.data, length)


def sampling_steps(cfg: DictConfig, meta: CheckpointMeta | None = None) -> int:
    """`sampling.steps`, or when null the checkpoint's own k (a D-MMD student), else 128."""
    if cfg.sampling.steps is not None:
        return int(cfg.sampling.steps)
    return int((meta.sampling_steps if meta is not None else None) or DEFAULT_STEPS)


def nfe_report(sampler, length: int, steps: int, cfg: DictConfig) -> dict[str, int]:
    """Report rows for a block model: its block size, steps per block and network evaluations in
    all (over `sampling.length` tokens when given, else the model's `length`), without and with
    the passes that commit finished blocks to the KV cache. Other diffusion models: the NFE where
    Duo's greedy tail adds a call to the steps; {} otherwise."""
    s = cfg.sampling
    length = int(s.get("length") or length)
    noise_removal = str(s.get("noise_removal", "ancestral"))
    if not getattr(sampler, "blockwise", False):
        calls = network_calls(steps, noise_removal)
        return {"NFE": calls} if calls != steps and not getattr(sampler, "autoregressive", False) else {}
    n = sampler.nfe(length, steps, kv_cache=s.get("kv_cache"), first_hitting=bool(s.get("first_hitting", False)),
                    noise_removal=noise_removal)
    return {"block size": sampler.block_size, "steps per block": n["per_block"],
            "NFE (all blocks)": n["denoising"], "NFE with KV-cache commits": n["total"]}


def held_out_rows(cfg: DictConfig, length: int, count: int) -> torch.Tensor:
    """Up to `count` validation rows [N, L], drawn at random with `sampling.seed`."""
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


def batch_seed(seed: int, batch: int) -> int:
    """The seed of sample batch `batch` under `sampling.seed`: the seed itself for batch 0 (so one
    batch is what `Pipeline.generate` draws with that seed), later batches (seed, batch) mixed by
    numpy's SeedSequence into 64 bits, so no two batches share a stream (seed 1's batch 1 is not
    seed 2's batch 0)."""
    if batch == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(batch)]).generate_state(1, np.uint64)[0])


def generate(model, cfg: DictConfig, steps: int, *, prompt_rows: torch.Tensor | None = None,
             progress: bool = True, ranks: Ranks = Ranks()) -> torch.Tensor:
    """`sampling.num_samples` sequences in `steps` steps, `sampling.batch_size` at a time, batch b
    drawn from `batch_seed(sampling.seed, b)`; with `prompt_rows` (see `prompt_rows`), sample i
    continues the first `sampling.prompt_length` tokens of row i. With several `ranks` each process
    draws its batches (b = rank, rank + world, ...) and rank 0 gets all the samples (the same
    samples as one process draws), the others an empty tensor. `model.stats["entropy_redraws"]`
    counts over all batches."""
    s = cfg.sampling
    prompts = None if prompt_rows is None else prompt_rows[:, : int(s.prompt_length)]
    count, size = int(s.num_samples), int(s.batch_size or s.num_samples)
    drawn, redraws = {}, 0
    for batch in ranks.mine(-(-count // size)):
        rows = slice(batch * size, min(count, (batch + 1) * size))
        # The generator must live where the samples are drawn (a CPU generator cannot feed CUDA draws).
        generator = torch.Generator(device=model.device).manual_seed(batch_seed(int(s.seed), batch))
        drawn[batch] = model.generate(
            rows.stop - rows.start, steps=steps, generator=generator, temperature=float(s.temperature),
            top_p=float(s.top_p), noise_removal=str(s.noise_removal), progress=progress and ranks.writer,
            prompts=None if prompts is None else prompts[rows], nucleus=str(s.get("nucleus", "keep")),
            kv_cache=s.get("kv_cache"), first_hitting=bool(s.get("first_hitting", False)),
            stop_at_eos=bool(s.get("stop_at_eos", False)), length=s.get("length"),
            entropy_redraw=bool(s.get("entropy_redraw", False)),
        )
        redraws += (getattr(model, "stats", None) or {}).get("entropy_redraws", 0)
    drawn = ranks.gather(drawn)
    if s.get("entropy_redraw") and hasattr(model, "stats"):
        model.stats = {"entropy_redraws": ranks.total(redraws)}
    if not drawn:  # a helping process: rank 0 has its batches
        return torch.empty(0, 0, dtype=torch.long)
    return torch.cat([drawn[batch] for batch in sorted(drawn)])


def metric_options(cfg: DictConfig, name: str) -> dict[str, Any]:
    """`eval.metric_options.<name>` as a plain dict (empty when not given)."""
    options = cfg.eval.get("metric_options") or {}
    return OmegaConf.to_container(options[name], resolve=True) if name in options else {}


def compute_metrics(cfg: DictConfig, samples: torch.Tensor, *, prompt_rows: torch.Tensor | None = None) -> dict[str, Any]:
    """`eval.metrics` of `samples`. With the `prompt_rows` the samples continue, metrics that
    take them (gradient_moment: conditional GM, paper §5) compare with those rows; the others
    score the whole sequences."""
    results = {}
    for name in cfg.eval.get("metrics", []) or []:
        extra = metric_options(cfg, name)
        metric = registry.load_metric(name)
        if prompt_rows is not None and "prompt_rows" in inspect.signature(metric).parameters:
            extra.update(prompt_rows=prompt_rows, prompt_length=int(cfg.sampling.prompt_length))
        value = metric(samples, data_config=cfg.data, **extra)
        results[name] = {k: v for k, v in value.items() if k != "per_sample"}
    return results


def check_metrics_ready(cfg: DictConfig) -> None:
    """Before sampling: each of `eval.metrics` that can check itself (`metric.check_ready(**options)`,
    plus `data_config=cfg.data` where it names that parameter; e.g. fid: its library and Inception
    weights, frechet: digits features need digits data) says now if it cannot run, not after the samples."""
    for name in cfg.eval.get("metrics", []) or []:
        check = getattr(registry.load_metric(name), "check_ready", None)
        if check is not None:
            try:  # a named parameter only: a plugin's **options may refuse keys it does not know
                takes_data = "data_config" in inspect.signature(check).parameters
            except (TypeError, ValueError):  # a callable inspect cannot read
                takes_data = False
            check(**metric_options(cfg, name), **({"data_config": cfg.data} if takes_data else {}))


@dataclass
class Scored:
    """One sampled and scored draw: the samples [N, L], `eval.metrics` of them, the prompting
    rows (None: unconditional) and the wall-clock seconds sampling took."""

    samples: torch.Tensor
    metrics: dict[str, Any]
    prompt_rows: torch.Tensor | None
    seconds: float


def sample_and_score(model, cfg: DictConfig, steps: int, *, progress: bool = False,
                     ranks: Ranks = Ranks()) -> Scored:
    """Sample `model` as `cfg.sampling` says (prompted when `sampling.prompt_length` > 0) in
    `steps` steps and score the samples with `eval.metrics` (rank 0 only; the other processes of
    several `ranks` help sample and get no metrics)."""
    prompts = prompt_rows(cfg, model.length)
    started = time.time()
    samples = generate(model, cfg, int(steps), prompt_rows=prompts, progress=progress, ranks=ranks)
    seconds = time.time() - started
    metrics = compute_metrics(cfg, samples, prompt_rows=prompts) if ranks.writer else {}
    return Scored(samples, metrics, prompts, seconds)


def with_sampling(cfg: DictConfig, **values) -> DictConfig:
    """A copy of `cfg` whose `sampling` node has `values` (e.g. num_samples=500, top_p=0.9)."""
    return OmegaConf.merge(cfg, {"sampling": values})


def flatten(metrics: dict[str, dict]) -> dict[str, float]:
    """{"frechet": {"value": v, "stderr": e, "columns": {...}}} → {"frechet": v, "frechet_stderr": e,
    ...} (a table row). A metric that measures several things (FD in two feature spaces, GM
    under two reference LMs) lists them in `columns`, each a column of its own."""
    flat: dict[str, float] = {}
    for name, result in metrics.items():
        extra = result.get("columns") or {}
        for column, value in {name: result["value"], f"{name}_stderr": result.get("stderr"), **extra}.items():
            if value is None or value != value:  # no error, or NaN
                continue
            if column in flat:
                raise RuntimeError(f"metric '{name}' reports a column '{column}' that another metric reports too")
            flat[column] = value
    return flat


def describe(cfg: DictConfig, name: str) -> str:
    """What metric `name`'s value column measures under this config's options, for plot labels:
    the metric's optional `describe(**options)` (e.g. frechet: which feature space is primary),
    else the name itself."""
    described = getattr(registry.load_metric(name), "describe", None)
    if described is None:
        return name
    return f"{name}: {described(**metric_options(cfg, name))}"
