"""`sweep.*` checked before anything is loaded or written: every problem at once, one line each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mdlm_dmmd.errors import UserError

METHOD_KEYS = ("name", "checkpoint", "steps", "top_p", "temperature", "distill_top_p")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _top_p_problem(key: str, value: Any) -> str | None:
    if not _is_number(value) or not 0 < value <= 1:
        return f"{key} must be in (0, 1], got {value!r}"
    return None


def _check_entry(i: int, entry: Any, cfg: DictConfig) -> tuple[dict, list[str]]:
    """A `sweep.methods` entry with defaults filled in (steps None = the student's own k)."""
    where = f"sweep.methods.{i}"
    if not isinstance(entry, dict):
        return {}, [f"{where} must be a mapping {{name, checkpoint, steps, top_p}}, got {entry!r}"]
    problems = []
    unknown = sorted(set(entry) - set(METHOD_KEYS))
    if unknown:
        problems.append(f"{where} has unknown key(s) {', '.join(map(str, unknown))}; accepted: {', '.join(METHOD_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"{where}.name must be a non-empty string, got {name!r}")
    checkpoint = entry.get("checkpoint")
    if checkpoint is None or not str(checkpoint).strip():
        problems.append(f"{where}.checkpoint is required (a .ckpt file or an exported directory)")
    elif not Path(str(checkpoint)).expanduser().exists():
        problems.append(f"{where}.checkpoint '{checkpoint}' does not exist")
    steps = entry.get("steps")
    if steps is not None:
        steps = list(steps) if isinstance(steps, list) else [steps]
        if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
            problems.append(f"{where}.steps must be a list of ints >= 1 (or null: a student's own k), got {entry.get('steps')!r}")
    top_p = entry.get("top_p")
    top_p = [float(cfg.sampling.top_p)] if top_p is None else list(top_p) if isinstance(top_p, list) else [top_p]
    if not top_p:
        problems.append(f"{where}.top_p must list at least one nucleus in (0, 1]")
    problems += [p for p in (_top_p_problem(f"{where}.top_p", v) for v in top_p) if p]
    temperature = entry.get("temperature")
    temperature = float(cfg.sampling.temperature) if temperature is None else temperature
    if not _is_number(temperature) or temperature < 0:
        problems.append(f"{where}.temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    distill_top_p = entry.get("distill_top_p")
    if distill_top_p is not None:
        problems += [p for p in [_top_p_problem(f"{where}.distill_top_p", distill_top_p)] if p]
    return {"name": name, "checkpoint": None if checkpoint is None else str(checkpoint), "steps": steps,
            "top_p": top_p, "temperature": temperature, "distill_top_p": distill_top_p}, problems


def check_config(cfg: DictConfig) -> tuple[list[dict], list[str]]:
    """(checked method entries, problems) for `sweep.*`; nothing is loaded yet."""
    sweep = cfg.sweep
    try:
        raw = OmegaConf.to_container(sweep.methods, resolve=True) if sweep.get("methods") is not None else []
    except Exception as err:  # an interpolation such as ${algo.teacher} that does not resolve
        raise UserError(f"sweep.methods does not resolve: {str(err).splitlines()[0]}") from err
    if not isinstance(raw, list):
        raise UserError(f"sweep.methods must be a list of {{name, checkpoint, steps, top_p}} entries, got {raw!r}")
    if not raw:
        raise UserError("sweep.methods is empty; list the checkpoints to score, e.g. "
                        "sweep.methods='[{name: teacher, checkpoint: RUN/checkpoints/final.ckpt, steps: [32, 64]}]'")
    entries, problems = [], []
    for i, entry in enumerate(raw):
        checked, found = _check_entry(i, entry, cfg)
        entries.append(checked)
        problems += found
    n = sweep.get("num_samples")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        problems.append(f"sweep.num_samples must be an int >= 1, got {n!r}")
    for key in ("reference_rows", "resume"):
        if not isinstance(sweep.get(key), bool):
            problems.append(f"sweep.{key} must be true or false, got {sweep.get(key)!r}")
    ar = sweep.get("ar_baseline")
    if ar is not None and not Path(str(ar)).expanduser().exists():
        problems.append(f"sweep.ar_baseline '{ar}' does not exist")
    problems += [p for p in [_top_p_problem("sweep.ar_top_p", sweep.get("ar_top_p"))] if p]
    literature = sweep.get("literature_csv")
    if literature is not None and not Path(str(literature)).expanduser().is_file():
        problems.append(f"sweep.literature_csv '{literature}' is not a file")
    return entries, problems


def reject_training_run_dir(run_dir: Path) -> None:
    """The sweep writes its own config.yaml: never inside the folder of a training run."""
    if (run_dir / "checkpoints").is_dir():
        raise UserError(f"run_dir '{run_dir}' holds a training run (checkpoints/); "
                        f"write the sweep elsewhere, e.g. run_dir={run_dir}/sweep")
