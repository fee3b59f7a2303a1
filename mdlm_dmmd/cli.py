"""The `mdlm-dmmd` host: compose the Hydra config, find the algo by entry point, run a mode.

    mdlm-dmmd algo=NAME [group=option ...] [key=value ...]      # mode=train (default)
    mdlm-dmmd mode=sample checkpoint=runs/x/checkpoints/last.ckpt sampling.steps=16
    mdlm-dmmd mode=eval checkpoint=... eval.metrics=[entropy]
    mdlm-dmmd experiment=quickstart        # mode=study: teacher, D-MMD students, table and plots
    mdlm-dmmd mode=sweep data=... sweep.methods='[{name: A, checkpoint: PATH, steps: [32, 64]}]'   # NFE x top-p tables

The host knows no algo by name: `algo=NAME` is checked against the `mdlm.algos` entry points,
and the class is loaded from there. Every user mistake ends in one line on stderr and exit
code 2 (set MDLM_DMMD_DEBUG=1 for the traceback), before anything is written to disk.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Sequence

from omegaconf import OmegaConf

from mdlm_dmmd import registry
from mdlm_dmmd.errors import UserError

GROUPS = ("data", "model", "noise", "trainer", "experiment", "debug")  # config groups besides algo


def mode_names() -> list[str]:
    """The modes `mode=` accepts, as `mdlm_dmmd.modes` registers them."""
    # Imported here and not at the top: the modes load torch and Lightning (seconds), which
    # `--help` and the config errors found before composing never need.
    from mdlm_dmmd.modes import MODES

    return list(MODES)


def _check_group_overrides(overrides: Sequence[str], search_paths: Sequence[str]) -> None:
    """Fail early, in one line, on `algo=`/`data=`/`model=`/... naming something unknown."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep:
            continue
        if key == "algo":
            registry.check_algo_config(value, search_paths)
        elif key in GROUPS and value != "null":
            options = registry.group_options(key, search_paths)
            if value not in options:
                hint = difflib.get_close_matches(value, options, n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise UserError(f"unknown {key} '{value}'; available: {', '.join(options)}{suggestion}")
        elif key == "mode":
            _check_mode(value)


def _check_mode(value) -> None:
    if value not in mode_names():
        raise UserError(f"mode must be one of {', '.join(mode_names())}, got '{value}'")


# Free-form dicts whose keys are not known in advance (per-metric options, per-student algo
# overrides): a plain `key=value` under them may add keys, as if written `++key=value`.
FREE_FORM = ("eval.metric_options", "study.student_overrides")


def _allow_new_keys(override: str) -> str:
    key = override.partition("=")[0]
    if override[:1] in "+~" or not any(key == f or key.startswith(f + ".") for f in FREE_FORM):
        return override
    return "++" + override


def compose(overrides: Sequence[str]):
    """The composed and checked config (a DictConfig) for command-line `overrides`."""
    _check_group_overrides(overrides, registry.config_search_paths())
    cfg = registry.compose_tree([_allow_new_keys(o) for o in overrides])
    _apply_natural_length(cfg, overrides)
    _resolve_data_from(cfg, overrides)
    registry.check_algo_name(cfg.algo.name)
    _check_mode(cfg.mode)
    for name in cfg.eval.get("metrics", []) or []:
        registry.check_metric_name(name)
    if cfg.mode in ("train", "study"):
        _check_training(cfg)  # first: sampling.seed interpolates seed, and should not be named for it
    _check_sampling(cfg)
    return cfg


def _override_keys(overrides: Sequence[str]) -> list[str]:
    """The dotted keys the command line sets (`+`, `++`, `~` stripped)."""
    return [o.lstrip("+~").partition("=")[0] for o in overrides]


def _apply_natural_length(cfg, overrides: Sequence[str]) -> None:
    """A dataset whose rows have one length (`data.natural_length`: digits, 64 pixels) sets
    `model.length` unless the command line gives it; a different explicit value stays the
    dataset's error to report."""
    natural = cfg.data.get("natural_length")
    given = "model.length" in _override_keys(overrides)
    if natural is not None and not given:
        cfg.model.length = natural


DATA_FROM = ("auto", "checkpoint", "config")


def _resolve_data_from(cfg, overrides: Sequence[str]) -> None:
    """`data_from=auto` becomes `config` when the command line chooses data (data=, a data.KEY,
    or an experiment, which may set it), else `checkpoint`: `mode=eval checkpoint=PATH` scores
    against what the checkpoint was trained on, not the default data."""
    if cfg.data_from not in DATA_FROM:
        raise UserError(f"data_from must be one of {', '.join(DATA_FROM)}, got {cfg.data_from!r}")
    keys = _override_keys(overrides)
    data_keys = [k for k in keys if k == "data" or k.startswith("data.")]
    if cfg.data_from == "checkpoint" and data_keys and cfg.mode in ("sample", "eval"):  # dropped for the stored node
        raise UserError(f"data_from=checkpoint reads the data the checkpoint stores (data= only where it stores "
                        f"none), so {data_keys[0]}= would be ignored; use data_from=config with data=NAME and its keys")
    if cfg.data_from == "auto":
        cfg.data_from = "config" if data_keys or "experiment" in keys else "checkpoint"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value, least: int) -> bool:
    """An int >= least, or a whole float such as Hydra's reading of `1e3`."""
    return _is_number(value) and float(value).is_integer() and value >= least


SEED_MAX = 2**32 - 1  # Lightning's seed_everything (numpy's legacy seeding) takes [0, 2^32 - 1]

# key: (accepted, test, null allowed). Without these, PyTorch and Lightning refuse the values deep
# inside fit with a traceback (AdamW's "Invalid learning rate", a ZeroDivisionError for
# accumulate_grad_batches=0 or val_check_interval=0) or take them silently (a negative EMA decay
# turned the EMA off, a negative clip value). What PyTorch or Lightning accept stays accepted
# (lr = 0, a whole float for a count, a time-based val_check_interval).
TRAINING_VALUES = {
    "seed": (f"an int in [0, {SEED_MAX}]", lambda v: _is_int(v) and 0 <= v <= SEED_MAX, False),
    "loader.batch_size": ("an int >= 1", lambda v: _is_int(v) and v >= 1, False),
    "loader.eval_batch_size": ("an int >= 1", lambda v: _is_int(v) and v >= 1, False),
    "loader.num_workers": ("an int >= 0", lambda v: _is_int(v) and v >= 0, False),
    "optim.lr": ("a number >= 0", lambda v: _is_number(v) and v >= 0, False),
    "optim.weight_decay": ("a number >= 0", lambda v: _is_number(v) and v >= 0, False),
    "optim.beta1": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1, False),
    "optim.beta2": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1, False),
    "optim.eps": ("a number >= 0", lambda v: _is_number(v) and v >= 0, False),
    "optim.warmup_steps": ("a whole number >= 0", lambda v: _is_count(v, 0), False),
    "training.ema": ("a number in [0, 1) (0 = off)", lambda v: _is_number(v) and 0 <= v < 1, False),
    "training.sampling_eps": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1, False),
    "trainer.accumulate_grad_batches": ("an int >= 1", lambda v: _is_int(v) and v >= 1, False),
    "trainer.gradient_clip_val": ("a number >= 0 or null (off)", lambda v: _is_number(v) and v >= 0, True),
    # numbers only: Lightning itself checks a time ('DD:HH:MM:SS', a dict) and when a float is allowed
    "trainer.val_check_interval": ("> 0 (steps, or with check_val_every_n_epoch a fraction of an epoch), "
                                   "a time 'DD:HH:MM:SS', or null",
                                   lambda v: not isinstance(v, bool) and (not _is_number(v) or v > 0),
                                   True),
}
STUDY_VALUES = {  # mode=study sets them on its student runs after this check
    "study.student_ema": ("a number in [0, 1) (0 = off)", lambda v: _is_number(v) and 0 <= v < 1, False),
    "study.student_max_steps": ("an int >= 1", lambda v: _is_int(v) and v >= 1, False),
}


def _check_training(cfg) -> None:
    """The training keys' values (mode=train and study), before anything is built or written."""
    from omegaconf.errors import OmegaConfBaseException

    values = {**TRAINING_VALUES, **(STUDY_VALUES if cfg.mode == "study" else {})}
    for key, (accepted, ok, nullable) in values.items():
        try:
            value = OmegaConf.select(cfg, key, default=None, throw_on_missing=True)
            present = OmegaConf.select(cfg, key, default=KeyError) is not KeyError
        except OmegaConfBaseException as err:  # ???, or an interpolation that does not resolve
            raise UserError(f"{key} cannot be read ({str(err).splitlines()[0]}); it must be {accepted}") from None
        if value is None and (nullable or not present):
            continue  # null where allowed, or a key this config does not have
        if not ok(value):
            raise UserError(f"{key} must be {accepted}, got {value!r}")


def _check_sampling(cfg) -> None:
    """Validate `sampling.*` now: train mode samples only after fitting, which is too late."""
    # Imported here and not at the top for the same reason as the modes (torch).
    from mdlm_dmmd.diffusion.sampling import check_sampling_args
    from mdlm_dmmd.eval.scoring import default_device, prompt_length

    s = cfg.sampling
    numbers = {}
    for key in ("temperature", "top_p"):
        value = s.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"sampling.{key} must be a number, got {value!r}")
        numbers[key] = float(value)
    steps = s.get("steps")  # null: the checkpoint's own k, resolved when sampling
    check_sampling_args(1 if steps is None else steps, numbers["temperature"], numbers["top_p"], "ancestral")
    least = 0 if cfg.mode == "train" else 1  # train: 0 = no samples after fitting
    for key, low, optional in (("num_samples", least, False), ("batch_size", 1, True), ("seed", 0, False)):
        value = s.get(key)  # seed >= 0: each batch's seed is mixed with numpy's SeedSequence
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            kind = "an int" if low is None else f"an int >= {low}"
            raise UserError(f"sampling.{key} must be {kind}, got {value!r}")
    length = s.get("length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise UserError(f"sampling.length must be null (model.length) or a positive int, got {length!r}")
    for key in ("kv_cache", "first_hitting", "stop_at_eos", "entropy_redraw"):
        if not isinstance(s.get(key, False), bool):
            raise UserError(f"sampling.{key} must be true or false, got {s.get(key)!r}")
    check_sampling_args(1, 1.0, 1.0, "ancestral", nucleus=s.get("nucleus", "keep"))
    for key in ("first_hitting", "stop_at_eos", "entropy_redraw"):
        if s.get(key) and cfg.mode == "train" and not getattr(registry.load_algo(cfg.algo.name), "block_diffusion", False):
            raise UserError(f"sampling.{key} is an option of the block sampler; algo={cfg.algo.name} is not block diffusion")
    default_device(cfg)  # sampling.device
    if cfg.mode in ("train", "study") and s.get("prompt_length"):
        prompt_length(cfg, cfg.model.length)  # sample/eval/sweep: checked against the checkpoint's length


def check_one_process(cfg) -> None:
    """mode=study trains and sweeps in one process: refuse several, whether torchrun started them
    (WORLD_SIZE) or Lightning would (trainer.devices / trainer.num_nodes)."""
    from omegaconf import OmegaConf

    from mdlm_dmmd.ranks import launched  # (imports torch: not at the top, to keep --help fast)

    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    single = devices == 1 or (OmegaConf.is_list(devices) and len(devices) == 1)
    if launched() > 1 or not single or nodes != 1:
        raise UserError(f"mode=study runs in one process (got trainer.devices={devices}, trainer.num_nodes={nodes}, "
                        f"{launched()} launched): train its runs with mode=train trainer.strategy=ddp "
                        f"trainer.devices=N, then score them with mode=sweep under torchrun")


def check_launcher(mode: str) -> None:
    """The modes outside Lightning (sample, eval, sweep, study) know torchrun's processes only.
    `srun` starting one task per GPU gives each task SLURM_PROCID but no WORLD_SIZE: every task
    would run the whole job alone and write the same files. Refuse in all but task 0."""
    task = os.environ.get("SLURM_PROCID", "")
    if "WORLD_SIZE" not in os.environ and task.isdigit() and int(task) > 0:
        raise UserError(f"mode={mode} under srun: this is task {task} of {os.environ.get('SLURM_NTASKS', '?')}, "
                        "and each task would run the whole job; start one task per node that runs "
                        "torchrun --nproc_per_node=N -m mdlm_dmmd mode=... (or a single task)")


def dispatch(cfg) -> None:
    """Run the mode `cfg.mode` names on the composed config."""
    from mdlm_dmmd.eval.scoring import check_metrics_ready
    from mdlm_dmmd.modes import MODES  # see mode_names
    from mdlm_dmmd.ranks import leave

    if cfg.mode != "train":
        check_launcher(cfg.mode)  # Lightning reads SLURM's tasks for training; the other modes need torchrun
    if cfg.mode == "study":
        check_one_process(cfg)
    scores = cfg.mode in ("eval", "sweep", "study") or (cfg.mode == "train" and int(cfg.sampling.num_samples) > 0)
    if scores and not (cfg.mode == "eval" and cfg.data_from == "checkpoint"):  # that: once the checkpoint is read
        check_metrics_ready(cfg)  # these modes score samples: a metric that cannot run fails before the work
    MODES[cfg.mode](cfg)
    leave()  # several processes of sample/eval/sweep (torchrun) end together


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        dispatch(compose(argv))
    except UserError as err:
        if os.environ.get("MDLM_DMMD_DEBUG"):
            raise
        print(f"mdlm-dmmd: error: {err}", file=sys.stderr)
        return 2
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
