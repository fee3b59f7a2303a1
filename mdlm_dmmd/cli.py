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

import os
import sys
from pathlib import Path
from typing import Sequence

from mdlm_dmmd.errors import UserError

MODES = ("train", "sample", "eval", "study", "sweep")


def config_dir() -> Path:
    """The shipped Hydra tree: `mdlm_dmmd/configs` when installed, `<repo>/configs` in a checkout."""
    try:
        import mdlm_dmmd.configs as shipped

        return Path(next(iter(shipped.__path__))).resolve()
    except ImportError:
        return Path(__file__).resolve().parents[1] / "configs"


def group_options(group: str, search_paths: Sequence[str] = ()) -> list[str]:
    """Option names of a config group across the main tree and plugin search paths."""
    folders = [config_dir() / group] + [Path(p.removeprefix("file://")) / group for p in search_paths]
    return sorted({f.stem for folder in folders if folder.is_dir() for f in folder.glob("*.yaml")})


def _check_group_overrides(overrides: Sequence[str], search_paths: Sequence[str]) -> None:
    """Fail early, in one line, on `algo=`/`data=`/`model=`/... naming something unknown."""
    from mdlm_dmmd import registry

    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep:
            continue
        if key == "algo":
            registry.check_algo_name(value)
            if value not in group_options("algo", search_paths):
                raise UserError(f"algo '{value}' is installed but has no config algo/{value}.yaml on the search path")
        elif key in ("data", "model", "noise", "trainer", "experiment", "debug") and value != "null":
            options = group_options(key, search_paths)
            if value not in options:
                import difflib

                hint = difflib.get_close_matches(value, options, n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                raise UserError(f"unknown {key} '{value}'; available: {', '.join(options)}{suggestion}")
        elif key == "mode" and value not in MODES:
            raise UserError(f"mode must be one of {', '.join(MODES)}, got '{value}'")


# Free-form dicts whose keys are not known in advance (per-metric options, per-student algo
# overrides): a plain `key=value` under them may add keys, as if written `++key=value`.
FREE_FORM = ("eval.metric_options", "study.student_algo")


def _allow_new_keys(override: str) -> str:
    key = override.partition("=")[0]
    if override[:1] in "+~" or not any(key == f or key.startswith(f + ".") for f in FREE_FORM):
        return override
    return "++" + override


def compose(overrides: Sequence[str]):
    """The composed config (a DictConfig) for command-line `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mdlm_dmmd import registry

    search_paths = registry.config_search_paths()
    _check_group_overrides(overrides, search_paths)
    extra = [f"hydra.searchpath=[{','.join(search_paths)}]"] if search_paths else []
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = hydra_compose("config", overrides=[_allow_new_keys(o) for o in overrides] + extra)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"bad config override: {first}") from err
    registry.check_algo_name(cfg.algo.name)
    if cfg.mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)}, got '{cfg.mode}'")
    for name in cfg.eval.get("metrics", []) or []:
        registry.check_metric_name(name)
    _check_sampling(cfg)
    return cfg


def _check_sampling(cfg) -> None:
    """Validate `sampling.*` now: train mode samples only after fitting, which is too late."""
    from mdlm_dmmd.diffusion.sampling import check_sampling_args

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
    for key, low, optional in (("num_samples", least, False), ("batch_size", 1, True), ("seed", None, False)):
        value = s.get(key)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            kind = "an int" if low is None else f"an int >= {low}"
            raise UserError(f"sampling.{key} must be {kind}, got {value!r}")
    from mdlm_dmmd.run import default_device, prompt_length

    default_device(cfg)  # sampling.device
    if cfg.mode == "train" and s.get("prompt_length"):
        prompt_length(cfg, cfg.model.length)  # sample/eval: checked against the checkpoint's length


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg = compose(argv)
        from mdlm_dmmd import run

        run.dispatch(cfg)
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
