"""Checkpoints × sampling steps × top-p, scored with `eval.metrics` (`mode=sweep`).

The evaluation protocol of the D-MMD paper's text experiments (§6.2, Tables 2 and 5, Fig. 3):
every method in `sweep.methods` (a teacher, a D-MMD student, ...) is sampled at each of its step
counts and sampling top-p values, with the same seed (`sampling.seed`) and number of samples
(`sweep.num_samples`), and scored with the same metrics (GPT-2 gradient moment, gen-PPL and
sample entropy on text; Fréchet distance on digits). Optional extra rows:

- "Data" (`sweep.reference_rows`): the metrics of held-out data sequences (`data.valid`)
  themselves, the floor every model is compared with (GM of data ≈ 0, Table 5's "Data" row);
  left out when `sampling.prompt_length` > 0 (samples then continue held-out prompts and GM is
  the conditional GM against those very rows, which have no second data continuation);
- "AR baseline" (`sweep.ar_baseline`): an `ar` checkpoint, sampled token by token (NFE = L);
- quoted rows (`sweep.literature_csv`): numbers copied from papers, marked "(quoted)" in the
  tables and drawn with an `x` marker, never mistaken for something measured here.

A row keeps two top-p values apart: `distill_top_p`, the teacher nucleus a D-MMD student was
distilled with (algo.teacher_top_p, §3.3; from the checkpoint when it records it, else from the
method's `distill_top_p`), and `top_p`, the nucleus it is sampled with. Row names follow the
paper: "Masked teacher (p = 0.85)", "Uniform D-MMD (p = 0.70/0.70)" (distillation/sampling).

Written to run_dir: `results.csv` (every row, every metric with its standard error),
`results.md` (one table per metric shaped like Tables 2/5, rows = method, columns = NFE; then
every row with value ± stderr), `nfe_<metric>.png`, and the trade-off scatters
`gen_ppl_vs_entropy.png` and `gm_vs_gen_ppl.png` when both of their metrics are present.

The judge is never judged: a `gradient_moment` or `gen_ppl` reference that is one of the
evaluated checkpoints (the AR baseline included) is refused. GM of a model's samples under
itself measures the score identity ‖E_q ∇L‖², not sample quality (research/algorithms.md §6.6),
and its gen-PPL is its own likelihood.

Everything (config, paths, checkpoints, the CSV) is checked before run_dir is created, so a wrong
input leaves nothing behind; `results.csv` is rewritten after every row, so a long sweep that
dies keeps what it measured, and the same command run again (`sweep.resume`, on by default)
keeps those rows and measures only the missing ones. A row is kept when its method, steps,
top-p values, temperature and checkpoint path match and the folder's `config.yaml` has the same
`data`, `sampling`, `eval` and `sweep.num_samples`; other settings there are an error, never a
silent mix (a checkpoint retrained at the same path is not noticed: use `sweep.resume=false`).
A job that repeats an earlier one (the same checkpoint, steps, top-p and temperature under
another method name, e.g. a teacher's step row and its top-p sweep at one step count) is not
sampled again: with the same seed it would give the same numbers. Training the checkpoints is
`mode=train` / `mode=study`'s job.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from mdlm_dmmd import registry, run
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.eval import plots
from mdlm_dmmd.eval.study import flatten
from mdlm_dmmd.pipeline import Pipeline

logger = logging.getLogger(__name__)

METHOD_KEYS = ("name", "checkpoint", "steps", "top_p", "temperature", "distill_top_p")
JUDGE_METRICS = ("gradient_moment", "gen_ppl")  # metrics whose `reference` option is a model
LITERATURE_KEYS = ("method", "steps", "distill_top_p", "top_p", "temperature", "note")
FIRST_COLUMNS = ["method", "label", "source", "steps", "distill_top_p", "top_p", "temperature"]
LAST_COLUMNS = ["num_samples", "sample_seconds", "checkpoint"]
RESUME_KEYS = ("method", "steps", "distill_top_p", "top_p", "temperature", "checkpoint")  # a row's identity
RESUME_SETTINGS = ("data", "sampling", "eval", "sweep.num_samples")  # what its numbers depend on
TEXT_COLUMNS = ("method", "label", "source", "checkpoint", "note")


@dataclass
class Method:
    """One checked `sweep.methods` entry (or the AR baseline), its checkpoint loaded on the CPU."""

    name: str
    checkpoint: str
    steps: list[int]
    top_p: list[float]
    temperature: float
    distill_top_p: float | None
    pipeline: Pipeline


# -- checking the config ------------------------------------------------------------------------
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


def _same_path(a: str, b: str) -> bool:
    """True when `a` and `b` are the same existing file or directory (links followed).

    A `.safetensors` file also counts as the exported directory that holds it: both load the
    same weights.
    """
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if not (pa.exists() and pb.exists()):
        return False
    candidates = [(pa, pb)]
    if pa.suffix == ".safetensors":
        candidates.append((pa.parent, pb))
    if pb.suffix == ".safetensors":
        candidates.append((pa, pb.parent))
    return any(os.path.samefile(x, y) for x, y in candidates)


def check_judges(cfg: DictConfig, evaluated: dict[str, str]) -> None:
    """Refuse a GM / gen-PPL reference that is also a checkpoint being evaluated.

    evaluated: config key -> checkpoint path (e.g. "sweep.methods.0.checkpoint" -> "a.ckpt").
    """
    options = cfg.eval.get("metric_options") or {}
    for metric in JUDGE_METRICS:
        if metric not in (cfg.eval.get("metrics") or []):
            continue
        reference = (options.get(metric) or {}).get("reference")
        if reference is None:
            continue
        for key, path in evaluated.items():
            if _same_path(str(reference), path):
                raise UserError(
                    f"eval.metric_options.{metric}.reference '{reference}' is also evaluated as {key}; "
                    f"the reference model must not judge itself: use another reference or drop it from the sweep")


def _reject_training_run_dir(run_dir: Path) -> None:
    # make_run_dir overwrites config.yaml: never inside the folder of a training run.
    if (run_dir / "checkpoints").is_dir():
        raise UserError(f"run_dir '{run_dir}' holds a training run (checkpoints/); "
                        f"write the sweep elsewhere, e.g. run_dir={run_dir}/sweep")


# -- resuming -----------------------------------------------------------------------------------
def _first_difference(old: Any, new: Any, key: str) -> str | None:
    """The first dotted key under which two plain containers differ, or None when equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(k, "<missing>"), new.get(k, "<missing>"), f"{key}.{k}")
            if found:
                return found
        return None
    return None if old == new else f"{key} ({old!r} there, {new!r} now)"


def _resume_key(row: dict) -> tuple[str, ...]:
    # compared as written to the CSV: str() of the measured values, the cells as read back
    return tuple(str(row.get(k, "")) for k in RESUME_KEYS)


def _parse_cell(column: str, cell: str) -> Any:
    if cell == "" or column in TEXT_COLUMNS:
        return cell
    if column in ("steps", "num_samples"):
        return int(cell)
    try:
        return float(cell)
    except ValueError:
        return cell


def measured_rows(cfg: DictConfig, run_dir: Path) -> dict[tuple[str, ...], dict]:
    """Rows a previous run of this sweep already measured in run_dir (empty when there are none
    or `sweep.resume` is off); a folder holding a sweep with other settings is an error."""
    results, saved = run_dir / "results.csv", run_dir / "config.yaml"
    if not cfg.sweep.resume or not results.is_file():
        return {}
    hint = "use another run_dir, or sweep.resume=false to measure every row again"
    if not saved.is_file():
        raise UserError(f"run_dir '{run_dir}' holds results.csv but no config.yaml to check its settings; {hint}")
    old = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    new = OmegaConf.to_container(cfg, resolve=True)
    for dotted in RESUME_SETTINGS:
        a, b = old, new
        for part in dotted.split("."):
            a, b = (a or {}).get(part, "<missing>"), (b or {}).get(part, "<missing>")
        difference = _first_difference(a, b, dotted)
        if difference:
            raise UserError(f"run_dir '{run_dir}' holds a sweep made with other settings: {difference}; {hint}")
    with open(results, newline="", encoding="utf-8") as f:
        return {_resume_key(row): {k: _parse_cell(k, v or "") for k, v in row.items() if k != "label"}
                for row in csv.DictReader(f) if row.get("source") in ("measured", "data")}


# -- loading the checkpoints --------------------------------------------------------------------
def _is_student(meta: dict) -> bool:
    return meta.get("sampling_rule") == "generator" or "teacher" in meta


def load_methods(cfg: DictConfig, entries: list[dict]) -> tuple[list[Method], Method | None, int]:
    """(methods, AR baseline or None, sequence length L), each checkpoint loaded once on the CPU.

    Checks what only the checkpoint can tell: a diffusion model (AR only as the baseline), a
    student's own k when steps is null, its distillation top-p, the data it was trained on, and
    one sequence length for the whole sweep.
    """
    loaded: dict[str, Pipeline] = {}

    def load(path: str) -> Pipeline:
        key = str(Path(path).expanduser().resolve())
        if key not in loaded:
            loaded[key] = Pipeline.from_checkpoint(path, device="cpu")
        return loaded[key]

    problems, lengths = [], {}
    methods: list[Method] = []
    for i, entry in enumerate(entries):
        where, path = f"sweep.methods.{i}", entry["checkpoint"]
        pipeline = load(path)
        meta = pipeline.meta
        if pipeline.process is None:
            problems.append(f"{where}.checkpoint '{path}' is an autoregressive (`ar`) model; pass it as sweep.ar_baseline")
            continue
        steps = entry["steps"]
        if steps is None:
            own = meta.get("sampling_steps")
            if own is None:
                problems.append(f"{where}.steps is null (the checkpoint's own k), but '{path}' is not a distilled "
                                f"student with a recorded k; list the steps, e.g. {where}.steps=[32,64]")
                continue
            steps = [int(own)]
        recorded, given = meta.get("teacher_top_p"), entry["distill_top_p"]
        if given is not None and not _is_student(meta):
            problems.append(f"{where}.distill_top_p is for distilled students, but '{path}' is a "
                            f"{meta.get('algo', 'non-distilled')} checkpoint; remove it")
        elif recorded is not None and given is not None and abs(float(recorded) - float(given)) > 1e-9:
            problems.append(f"{where}.distill_top_p={given} contradicts the checkpoint, distilled with "
                            f"teacher_top_p={recorded}; remove it")
        trained_on = (meta.get("data") or {}).get("name")
        if trained_on is not None and trained_on != cfg.data.name:
            problems.append(f"{where}.checkpoint '{path}' was trained on data '{trained_on}' but the sweep "
                            f"scores against data={cfg.data.name}; pass data={trained_on}")
        lengths[where] = pipeline.network.config.length
        distill_top_p = recorded if recorded is not None else given  # None: a teacher, or not known
        methods.append(Method(entry["name"], path, steps, [float(p) for p in entry["top_p"]], float(entry["temperature"]),
                              None if distill_top_p is None else float(distill_top_p), pipeline))
    ar = None
    ar_path = cfg.sweep.get("ar_baseline")
    if ar_path is not None:
        pipeline = load(str(ar_path))
        if pipeline.process is not None:
            problems.append(f"sweep.ar_baseline '{ar_path}' is a {pipeline.meta.get('process', 'diffusion')} "
                            f"diffusion checkpoint, not one of the `ar` algo")
        else:
            length = pipeline.network.config.length
            lengths["sweep.ar_baseline"] = length
            ar = Method("AR baseline", str(ar_path), [length], [float(cfg.sweep.ar_top_p)],
                        float(cfg.sampling.temperature), None, pipeline)
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        problems.append(f"all checkpoints of a sweep must share one sequence length, got {listed}")
    if problems:
        raise UserError("; ".join(problems))
    return methods, ar, next(iter(lengths.values()))


# -- literature rows ----------------------------------------------------------------------------
def read_literature(path: str, metrics: list[str]) -> list[dict]:
    """Rows of a CSV of quoted numbers (columns: method, steps, metric names, `<metric>_stderr`,
    optionally distill_top_p, top_p, temperature, note); blanks are missing values."""
    accepted_metrics = sorted(set(registry.plugins(registry.METRIC_GROUP)) | set(metrics))
    with open(Path(path).expanduser(), newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        records = list(reader)
    accepted = set(LITERATURE_KEYS) | set(accepted_metrics) | {f"{m}_stderr" for m in accepted_metrics}
    unknown = [c for c in columns if c not in accepted]
    if "method" not in columns or "steps" not in columns or unknown:
        problem = f"unknown column(s) {', '.join(unknown)}" if unknown else "columns 'method' and 'steps' are required"
        raise UserError(f"sweep.literature_csv '{path}': {problem}; accepted: method, steps, "
                        f"distill_top_p, top_p, temperature, note, and metric names ({', '.join(accepted_metrics)}) "
                        f"with optional <metric>_stderr")
    rows = []
    for line, record in enumerate(records, start=2):
        record = {k.strip(): (v or "").strip() for k, v in record.items() if k is not None}
        row: dict[str, Any] = {"method": record["method"], "source": "quoted", "note": record.get("note", "")}
        if not row["method"]:
            raise UserError(f"sweep.literature_csv '{path}' line {line}: method is empty")
        for key, value in record.items():
            if key in ("method", "note") or value == "":
                continue
            try:
                number = float(value)
            except ValueError as err:
                raise UserError(f"sweep.literature_csv '{path}' line {line}: {key} must be a number, got '{value}'") from err
            if key == "steps":
                if number != int(number) or number < 1:
                    raise UserError(f"sweep.literature_csv '{path}' line {line}: steps must be an int >= 1, got '{value}'")
                number = int(number)
            row[key] = number
        rows.append(row)
    return rows


# -- rows ---------------------------------------------------------------------------------------
def row_label(row: dict) -> str:
    """Table/legend name: "Masked teacher (p = 0.85)", "Masked D-MMD (p = 0.85/1.00)" (distillation/
    sampling top-p), temperature when not 1, "(quoted)" for copied numbers; "Data" as is."""
    if row.get("source") == "data":
        return str(row["method"])
    parts = []
    top_p, distill = row.get("top_p"), row.get("distill_top_p")
    if top_p not in (None, ""):
        parts.append(f"p = {float(distill):.2f}/{float(top_p):.2f}" if distill not in (None, "") else f"p = {float(top_p):.2f}")
    temperature = row.get("temperature")
    if temperature not in (None, "") and float(temperature) != 1.0:
        parts.append(f"T = {float(temperature):g}")
    label = str(row["method"]) + (f" ({', '.join(parts)})" if parts else "")
    return label + (" (quoted)" if row.get("source") == "quoted" else "")


def _jobs(methods: list[Method], ar: Method | None) -> list[tuple[Method, int, float]]:
    jobs = [(m, s, p) for m in methods for s in m.steps for p in m.top_p]
    if ar is not None:
        jobs.append((ar, ar.steps[0], ar.top_p[0]))
    return jobs


def _check_unique(rows: list[dict]) -> None:
    seen = set()
    for row in rows:
        key = (row_label(row), row.get("steps"))
        if key in seen:
            raise UserError(f"the sweep would produce two rows '{key[0]}' at {key[1]} steps; "
                            f"give the sweep.methods entries different names or steps")
        seen.add(key)


def measure(cfg: DictConfig, method: Method, steps: int, top_p: float) -> dict:
    """Sample one (method, steps, top-p) with `sweep.num_samples` and `sampling.seed`, and score it."""
    sampling_cfg = OmegaConf.merge(cfg, {"sampling": {"num_samples": int(cfg.sweep.num_samples),
                                                      "top_p": float(top_p), "temperature": method.temperature}})
    prompts = run.prompt_rows(sampling_cfg, method.pipeline.length)
    started = time.time()
    samples = run.generate(method.pipeline, sampling_cfg, int(steps), prompt_rows=prompts, progress=False)
    seconds = time.time() - started
    metrics = run.compute_metrics(sampling_cfg, samples, prompt_rows=prompts)
    return {**_row_keys(method, steps, top_p), **flatten(metrics),
            "num_samples": int(cfg.sweep.num_samples), "sample_seconds": round(seconds, 3)}


def _job_key(method: Method, steps: int, top_p: float) -> tuple:
    # rows with equal keys sample the same checkpoint with the same seed: identical numbers
    return Path(method.checkpoint).resolve(), int(steps), float(top_p), float(method.temperature)


def _row_keys(method: Method, steps: int, top_p: float) -> dict:
    return {"method": method.name, "source": "measured", "steps": int(steps),
            "distill_top_p": "" if method.distill_top_p is None else method.distill_top_p,
            "top_p": float(top_p), "temperature": method.temperature, "checkpoint": method.checkpoint}


def _data_row_keys(cfg: DictConfig) -> dict:
    return {"method": "Data", "source": "data", "steps": "", "distill_top_p": "", "top_p": "", "temperature": "",
            "checkpoint": f"data={cfg.data.name} (valid split)"}


def measure_data(cfg: DictConfig, length: int) -> dict:
    rows = run.held_out_rows(cfg, length, int(cfg.sweep.num_samples))
    return {**_data_row_keys(cfg), **flatten(run.compute_metrics(cfg, rows)), "num_samples": len(rows),
            "sample_seconds": ""}


# -- the mode -----------------------------------------------------------------------------------
def run_sweep(cfg: DictConfig) -> Path:
    # 1. check everything before anything is written
    entries, problems = check_config(cfg)
    if problems:
        raise UserError("; ".join(problems))
    evaluated = {f"sweep.methods.{i}.checkpoint": e["checkpoint"] for i, e in enumerate(entries)}
    if cfg.sweep.get("ar_baseline") is not None:
        evaluated["sweep.ar_baseline"] = str(cfg.sweep.ar_baseline)
    check_judges(cfg, evaluated)
    run_dir = Path(cfg.run_dir)
    _reject_training_run_dir(run_dir)
    metrics = list(cfg.eval.get("metrics") or [])
    quoted = read_literature(str(cfg.sweep.literature_csv), metrics) if cfg.sweep.get("literature_csv") else []
    methods, ar, length = load_methods(cfg, entries)
    jobs = _jobs(methods, ar)
    _check_unique([_row_keys(m, s, p) for m, s, p in jobs] + quoted)
    columns = metric_columns(metrics, quoted)
    done = measured_rows(cfg, run_dir)

    # 2. sample and score, one row at a time (results.csv rewritten after each)
    run_dir = run.make_run_dir(cfg)
    device = run.default_device(cfg)
    rows: list[dict] = []
    measured: dict[tuple, dict] = {}
    data_row = bool(cfg.sweep.reference_rows) and not cfg.sampling.get("prompt_length")
    total = len(jobs) + int(data_row)
    with tqdm(total=total, desc="sweep", unit="row") as bar:
        for i, (method, steps, top_p) in enumerate(jobs):
            bar.set_postfix_str(f"{method.name}, {steps} steps, top-p {top_p:g}")
            keys, job = _row_keys(method, steps, top_p), _job_key(method, steps, top_p)
            kept = done.get(_resume_key(keys))
            twin = measured.get(job)  # same checkpoint, steps, top-p, temperature and seed
            if kept is not None:
                rows.append(kept)
            elif twin is not None:
                rows.append({**twin, **keys})
            else:
                method.pipeline.network.to(device)
                rows.append(measure(cfg, method, steps, top_p))
            if all(method is not later for later, _, _ in jobs[i + 1:]):
                method.pipeline.network.to("cpu")  # done with it (measured or not): free the accelerator
            measured.setdefault(job, rows[-1])
            origin = "kept from results.csv" if kept else "same draw as an earlier row" if twin else "measured"
            logger.info("sweep (%s): %s", origin, rows[-1])
            write_csv(run_dir, rows + quoted, columns)
            bar.update()
        if data_row:  # (prompted sampling: no second data continuation of a prompt exists)
            bar.set_postfix_str("Data (held-out sequences)")
            rows.append(done.get(_resume_key(_data_row_keys(cfg))) or measure_data(cfg, length))
            write_csv(run_dir, rows + quoted, columns)
            bar.update()
    rows += quoted

    # 3. tables and pictures
    for row in rows:
        row["label"] = row_label(row)
    write_csv(run_dir, rows, columns)
    pictures = write_plots(run_dir, rows, columns)
    write_markdown(run_dir, cfg, rows, columns, pictures, length)
    print(f"sweep written to {run_dir} (results.csv, results.md, {', '.join(pictures)})")
    return run_dir


def metric_columns(metrics: list[str], quoted: list[dict]) -> list[str]:
    """The metric names of the tables: `eval.metrics`, then any only quoted, in order."""
    names = list(metrics)
    for row in quoted:
        names += [k for k in row if k not in LITERATURE_KEYS and k not in ("source", "label")
                  and not k.endswith("_stderr") and k not in names]
    return names


# -- outputs ------------------------------------------------------------------------------------
def write_csv(run_dir: Path, rows: list[dict], metrics: list[str]) -> None:
    columns = FIRST_COLUMNS + [c for m in metrics for c in (m, f"{m}_stderr")] + LAST_COLUMNS + ["note"]
    with open(run_dir / "results.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "label": row.get("label") or row_label(row)})


def _value(row: dict, metric: str) -> float | None:
    value = row.get(metric)
    if value in (None, ""):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if stderr is None else f"{value:.4g} ± {stderr:.2g}"


def nfe_table(rows: list[dict], metric: str) -> list[str]:
    """Markdown table of `metric`: one row per method label, one column per NFE (Tables 2/5);
    rows without steps (Data) fill a last "—" column."""
    having = [r for r in rows if _value(r, metric) is not None]
    steps = sorted({int(r["steps"]) for r in having if r.get("steps") not in (None, "")})
    stepless = any(r.get("steps") in (None, "") for r in having)
    header = [str(s) for s in steps] + (["—"] if stepless else [])
    lines = ["| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for label in dict.fromkeys(r["label"] for r in having):
        cells = {("—" if r.get("steps") in (None, "") else str(int(r["steps"]))): _fmt(_value(r, metric))
                 for r in having if r["label"] == label}
        lines.append(f"| {label} | " + " | ".join(cells.get(h, "") for h in header) + " |")
    return lines


def write_markdown(run_dir: Path, cfg: DictConfig, rows: list[dict], metrics: list[str], pictures: list[str],
                   length: int) -> None:
    options = cfg.eval.get("metric_options")
    options = OmegaConf.to_container(options, resolve=True) if options else {}
    literature = cfg.sweep.get("literature_csv")
    lines = [
        f"# Sweep on {cfg.data.name}",
        "",
        f"Each measured row: {int(cfg.sweep.num_samples)} samples of {length} tokens, seed {int(cfg.sampling.seed)}, "
        f"scored with {', '.join(cfg.eval.metrics or [])}"
        + (f" (options: `{options}`)" if options else "") + ". "
        "NFE = sampling steps (network calls; the AR baseline makes L). "
        "\"(p = 0.85)\": sampled with top-p 0.85; \"(p = 0.85/1.00)\": a student distilled with teacher top-p 0.85, "
        "sampled with top-p 1.00. \"Data\": the metrics of held-out data sequences themselves."
        + (f" Rows marked (quoted) are copied from `{literature}`, not measured." if literature else ""),
        "",
    ]
    for metric in metrics:
        if any(_value(r, metric) is not None for r in rows):
            lines += [f"## {metric} vs NFE", "", *nfe_table(rows, metric), ""]
    head = ["method", "NFE", "distill top-p", "top-p", "temperature", *metrics]
    lines += ["## All rows (value ± standard error)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], str(r.get("steps", "")), _fmt(_value(r, "distill_top_p")), _fmt(_value(r, "top_p")),
                 _fmt(_value(r, "temperature"))]
        cells += [_fmt(_value(r, m), _value(r, f"{m}_stderr")) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Numbers: `results.csv`. Pictures: " + ", ".join(f"`{p}`" for p in pictures) + ".", ""]
    (run_dir / "results.md").write_text("\n".join(lines), encoding="utf-8")


TRADEOFFS = (("entropy", "gen_ppl", "gen_ppl_vs_entropy.png"),   # (x, y, file): the Pareto view
             ("gen_ppl", "gradient_moment", "gm_vs_gen_ppl.png"))  # Fig. 3


def write_plots(run_dir: Path, rows: list[dict], metrics: list[str]) -> list[str]:
    """nfe_<metric>.png per metric with values, and the trade-off scatters; returns file names."""
    written = []
    for metric in metrics:
        if any(_value(r, metric) is not None for r in rows):
            name = f"nfe_{metric}.png"
            plots.metric_vs_steps(rows, metric, run_dir / name, group="label", errorbars=True)
            written.append(name)
    present = {m for m in metrics if any(_value(r, m) is not None for r in rows)}
    for x, y, name in TRADEOFFS:
        if {x, y} <= present:
            plots.tradeoff(rows, x, y, run_dir / name, group="label")
            written.append(name)
    return written
