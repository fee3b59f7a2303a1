"""mode=study: a teacher and its distilled students on one dataset, end to end.

1. Train the teacher described by the composed config (or reuse the cached one trained with the
   same settings), 2. distil one student per (k, noise input) in `study.*` with the distillation
   algo `study.student_algo` (its `algo/NAME.yaml` plus `study.student_overrides`), 3. sample the
   teacher at `study.teacher_steps` and every student at its own k with the same seed and number
   of samples, 4. score them with `eval.metrics`, 5. write `results.csv`, `report.md`,
   `samples.png` (a grid per method, image data) and `pareto.png` (first metric vs steps).

A distillation algo is one whose config has a `teacher` key. Its config says how a student gets
its k (`steps_key`): `sampling_steps` (D-MMD: one student trained per k), `final_steps` (SDTT:
one student per k, its rounds run down to k), or neither (IDLM: one student, not trained for a
k, sampled at every k). `noise_input` is set only where `study.noise_input` asks for true or
false. What a row says about a student comes from its checkpoint: the noise input from the
loaded generator (`noise_dim` > 0), the generator output entropy (paper Table 6) from the last
training steps recorded there.
The quickstart and the digits reproduction in `benchmarks/` are this recipe at two sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from mdlm_dmmd import registry
from mdlm_dmmd.checkpoints import _torch_load
from mdlm_dmmd.data import build_data
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.eval import plots
from mdlm_dmmd.eval.scoring import default_device, describe, flatten, sample_and_score, with_sampling
from mdlm_dmmd.eval.tables import cell, markdown_table, shown_columns, write_csv
from mdlm_dmmd.files import atomic_write
from mdlm_dmmd.pipeline import Pipeline
from mdlm_dmmd.training import fit, make_run_dir

NOISE_LABELS = {None: "", True: " (noise input)", False: " (no noise input)"}
FOLDER_NAMES = {None: "default", True: "noise", False: "nonoise"}
FIRST_COLUMNS = ["method", "steps", "noise_input"]
METHOD_NAMES = {"dmmd": "D-MMD", "sdtt": "SDTT", "idlm": "IDLM"}  # the papers' spellings, for tables


def _cache_root() -> Path:
    return Path(os.environ.get("MDLM_DMMD_CACHE", Path.home() / ".cache" / "mdlm_dmmd"))


def teacher_key(cfg: DictConfig) -> str:
    """Hash of every setting that changes the trained teacher (not sampling or study keys)."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("algo", "model", "data", "noise", "optim", "training", "loader")}
    parts["data"].pop("natural_length", None)  # a default for model.length (hashed itself): cached teachers stay valid
    parts["trainer"] = {k: cfg.trainer.get(k) for k in ("max_steps", "accumulate_grad_batches", "gradient_clip_val", "precision")}
    parts["seed"] = int(cfg.seed)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_checkpoint(cfg: DictConfig, run_dir: Path) -> tuple[Path, str]:
    """(checkpoint, how it was obtained): reused from the cache, or trained now and cached."""
    cached = _cache_root() / "teachers" / f"{cfg.algo.name}-{teacher_key(cfg)}.ckpt"
    if cfg.study.reuse_teacher and cached.is_file():
        return cached, f"reused from cache ({cached})"
    teacher_cfg = cfg.copy()
    teacher_cfg.mode = "train"
    teacher_cfg.run_dir = str(run_dir / "teacher")
    fitted = fit(teacher_cfg)
    if fitted is None:
        raise UserError("teacher training was interrupted; its crash.ckpt is in the teacher folder")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cached) as partial:  # an interrupted copy leaves no torn teacher for a later study
            shutil.copyfile(fitted.checkpoint, partial)
    except OSError as err:
        raise UserError(f"the teacher cache '{cached.parent}' cannot be written ({err.strerror or err}); set "
                        f"MDLM_DMMD_CACHE to a writable folder or study.reuse_teacher=false") from err
    return fitted.checkpoint, f"trained here in {fitted.minutes:.1f} min ({int(cfg.trainer.max_steps)} steps)"


def student_algo(cfg: DictConfig) -> DictConfig:
    """The students' `algo` node: `algo/<study.student_algo>.yaml` as the config search path
    finds it, merged with `study.student_overrides`; checked before anything is trained."""
    study = cfg.study
    name = study.get("student_algo")
    if not isinstance(name, str) or not name:
        raise UserError(f"study.student_algo must name an installed distillation algo (e.g. dmmd), got {name!r}")
    try:
        composed = registry.algo_config(name)
    except UserError as err:
        raise UserError(f"study.student_algo: {err}") from err
    # a plain copy: Hydra's struct flag would refuse override keys the algo does not know, which
    # the algo's own validation names better; interpolations resolve in the student's config
    algo = OmegaConf.create(OmegaConf.to_container(composed, resolve=False))
    if "teacher" not in algo:
        raise UserError(f"study.student_algo '{name}' is not a distillation algo: its config has no teacher key")
    if any(noise is not None for noise in study.noise_input) and "noise_input" not in algo:
        raise UserError(f"study.noise_input={list(study.noise_input)} but algo '{name}' has no noise_input key; "
                        f"use study.noise_input=[null]")
    return OmegaConf.merge(algo, study.get("student_overrides") or {})


def steps_key(algo: DictConfig) -> str | None:
    """The student config key that sets its k: `sampling_steps`, `final_steps`, or None (one
    student for every k)."""
    return next((key for key in ("sampling_steps", "final_steps") if key in algo), None)


def student_config(cfg: DictConfig, algo: DictConfig, teacher: Path, steps: int | None, noise: bool | None,
                   run_dir: Path) -> DictConfig:
    """The teacher's config with `algo` replaced by the student's for k = `steps` (None: a
    student of no particular k; noise None: its own setting). The teacher is named by its
    resolved path, so the saved config works from any directory."""
    algo = algo.copy()
    algo.teacher = str(Path(teacher).expanduser().resolve())
    if steps is not None:
        algo[steps_key(algo)] = int(steps)
    if noise is not None:
        algo.noise_input = noise
    student = cfg.copy()
    student.algo = algo
    student.mode = "train"
    student.run_dir = str(run_dir / "_".join([algo.name, *([f"k{steps}"] if steps is not None else []),
                                              FOLDER_NAMES[noise]]))
    student.trainer.max_steps = int(cfg.study.student_max_steps)
    student.training.ema = float(cfg.study.student_ema)
    return student


def evaluate(cfg: DictConfig, checkpoint: Path, steps: int) -> tuple[dict[str, Any], torch.Tensor, Pipeline]:
    """Sample a checkpoint with `steps` steps (`study.num_samples`, fixed seed) and score it."""
    pipeline = Pipeline.from_checkpoint(checkpoint, device=default_device(cfg))
    scored = sample_and_score(pipeline, with_sampling(cfg, num_samples=int(cfg.study.num_samples)), int(steps))
    return scored.metrics, scored.samples, pipeline


def student_facts(checkpoint: Path, pipeline: Pipeline) -> dict[str, Any]:
    """What a student's checkpoint records about it: a generator noise input or not, and the
    generator output entropy (paper Table 6) averaged over its last training steps (blank when
    its algo records none)."""
    recorded = (_torch_load(checkpoint).get("distillation") or {}).get("recent_gen_entropy")
    entropy = "" if recorded is None else sum(recorded) / max(len(recorded), 1)
    return {"noise_input": int(pipeline.meta.noise_dim or 0) > 0, "gen_output_entropy": entropy}


def check_students(cfg: DictConfig, algo: DictConfig) -> None:
    """The study's step lists and noise settings, then every student's settings by its algo's own
    checks (`settings_from`, optional for plugins), before the teacher trains: a value the algo
    refuses would otherwise surface after it."""
    study = cfg.study
    for key in ("teacher_steps", "student_steps"):
        steps = study.get(key)
        if not isinstance(steps, ListConfig) or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                                         for k in steps):  # empty: no teacher rows / no students
            raise UserError(f"study.{key} must be a list of ints >= 1, got {steps!r}")
    settings = study.get("noise_input")
    if not isinstance(settings, ListConfig) or not all(n in FOLDER_NAMES for n in settings):
        raise UserError(f"study.noise_input must be a list of true, false or null, got {settings!r}")
    settings_from = getattr(registry.load_algo(algo.name), "settings_from", None)
    if settings_from is None:
        return
    per_k = steps_key(algo) is not None
    for noise in study.noise_input:
        for steps in study.student_steps if per_k else [None]:
            student = student_config(cfg, algo, Path("teacher.ckpt"), steps, noise, Path(cfg.run_dir))
            try:
                settings_from(student)
            except UserError as err:
                which = f"k={steps}, " if per_k else ""
                raise UserError(f"study.student_algo={algo.name} student ({which}noise_input={noise}; from "
                                f"study.student_steps, noise_input and student_overrides, with trainer.max_steps = "
                                f"study.student_max_steps): {err}") from None


def run(cfg: DictConfig) -> Path:
    study = cfg.study
    algo = student_algo(cfg)
    check_students(cfg, algo)
    label = study.get("student_label") or METHOD_NAMES.get(algo.name, algo.name)
    run_dir = make_run_dir(cfg)

    teacher, teacher_note = teacher_checkpoint(cfg, run_dir)
    print(f"[study] teacher: {teacher_note}")
    rows, grids = [], {}
    for steps in study.teacher_steps:
        metrics, samples, _ = evaluate(cfg, teacher, steps)
        rows.append({"method": "teacher", "steps": int(steps), "noise_input": "", **flatten(metrics)})
        grids[f"teacher, {steps} steps"] = samples
        print(f"[study] teacher @ {steps} steps: {rows[-1]}")
    per_k = steps_key(algo) is not None
    for noise in study.noise_input:
        fitted = None
        for steps in study.student_steps:
            if per_k or fitted is None:  # a student of no particular k is trained once
                fitted = fit(student_config(cfg, algo, teacher, steps if per_k else None, noise, run_dir))
            if fitted is None:
                raise UserError("student training was interrupted; its crash.ckpt is in the student folder")
            metrics, samples, pipeline = evaluate(cfg, fitted.checkpoint, steps)
            method = label + NOISE_LABELS[noise]
            facts = student_facts(fitted.checkpoint, pipeline)
            rows.append({"method": method, "steps": int(steps), "noise_input": facts["noise_input"], **flatten(metrics),
                         "gen_output_entropy": facts["gen_output_entropy"], "train_minutes": round(fitted.minutes, 2)})
            grids[f"{method}, {steps} steps"] = samples
            print(f"[study] {method} @ {steps} steps: {rows[-1]}")
    write_outputs(run_dir, cfg, rows, grids, teacher_note, label)
    print(f"[study] written to {run_dir}")
    return run_dir


def write_outputs(run_dir: Path, cfg: DictConfig, rows: list[dict], grids: dict[str, torch.Tensor],
                  teacher_note: str, label: str) -> None:
    # metrics in eval.metrics order, each followed by its extra columns (e.g. fd_/kid_<space>)
    columns = FIRST_COLUMNS + [k for k in dict.fromkeys(k for row in rows for k in row) if k not in FIRST_COLUMNS]
    write_csv(run_dir / "results.csv", rows, columns)
    metric = (cfg.eval.metrics or ["entropy"])[0]
    lines = [
        f"# Teacher vs {label} students on {cfg.data.name}",
        "",
        f"Teacher: {cfg.algo.name}, {teacher_note}. Students: {int(cfg.study.student_max_steps)} updates each. "
        f"Each row: {int(cfg.study.num_samples)} samples, seed {int(cfg.sampling.seed)}.",
        "",
        *markdown_table(shown_columns(columns), ([cell(row, c) for c in shown_columns(columns)] for row in rows)),
        "",
        f"Samples: `samples.png`; first metric vs steps (`pareto.png`): {describe(cfg, metric)}; "
        "numbers: `results.csv`.",
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    data = build_data(cfg.data, cfg.model.length)
    if data.modality == "image":  # text samples are in each student's run folder
        plots.sample_panels({label: data.sample_grid(samples[:36], nrow=6) for label, samples in grids.items()},
                            run_dir / "samples.png")
    plots.metric_vs_steps(rows, metric, run_dir / "pareto.png", group="method", title=describe(cfg, metric))
