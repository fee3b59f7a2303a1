"""Teacher vs. D-MMD students on one dataset, end to end (`mode=study`).

1. Train the teacher described by the composed config (or reuse the cached one trained with the
   same settings), 2. distil one D-MMD student per (k, noise input) in `study.*`, 3. sample the
   teacher at `study.teacher_steps` and every student at its own k with the same seed and
   number of samples, 4. score them with `eval.metrics`, 5. write `results.csv`, `report.md`,
   `samples.png` (a grid per method) and `pareto.png` (first metric vs steps).

The quickstart and the digits reproduction in `benchmarks/` are this recipe at two sizes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mdlm_dmmd import run
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.pipeline import Pipeline


def _cache_root() -> Path:
    import os

    return Path(os.environ.get("MDLM_DMMD_CACHE", Path.home() / ".cache" / "mdlm_dmmd"))


def teacher_key(cfg: DictConfig) -> str:
    """Hash of every setting that changes the trained teacher (not sampling or study keys)."""
    parts = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("algo", "model", "data", "noise", "optim", "training", "loader")}
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
    fitted = run.fit(teacher_cfg)
    if fitted is None:
        raise UserError("teacher training was interrupted; its crash.ckpt is in the teacher folder")
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fitted.checkpoint, cached)
    return fitted.checkpoint, f"trained here in {fitted.minutes:.1f} min ({int(cfg.trainer.max_steps)} steps)"


LABELS = {None: "D-MMD", True: "D-MMD (noise input)", False: "D-MMD (no noise input)"}
FOLDER_NAMES = {None: "default", True: "noise", False: "nonoise"}


def student_config(cfg: DictConfig, teacher: Path, steps: int, noise: bool | None, run_dir: Path) -> DictConfig:
    """The teacher's config with `algo` replaced by dmmd.yaml plus `study.student_algo`.

    noise None keeps dmmd's default (noise input on for masked teachers, off for uniform).
    """
    from mdlm_dmmd.cli import config_dir

    algo = OmegaConf.merge(OmegaConf.load(config_dir() / "algo" / "dmmd.yaml"), cfg.study.get("student_algo") or {})
    algo.teacher, algo.sampling_steps, algo.noise_input = str(teacher), int(steps), noise
    student = cfg.copy()
    student.algo = algo
    student.mode = "train"
    student.run_dir = str(run_dir / f"dmmd_k{steps}_{FOLDER_NAMES[noise]}")
    student.trainer.max_steps = int(cfg.study.student_max_steps)
    student.training.ema = float(cfg.study.student_ema)
    return student


def evaluate(cfg: DictConfig, checkpoint: Path, steps: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Sample a checkpoint with `steps` steps (`study.num_samples`, fixed seed) and score it."""
    pipeline = Pipeline.from_checkpoint(checkpoint, device=run.default_device(cfg))
    sampling_cfg = OmegaConf.merge(cfg, {"sampling": {"num_samples": int(cfg.study.num_samples)}})
    samples = run.generate(pipeline, sampling_cfg, int(steps), progress=False)
    return run.compute_metrics(cfg, samples), samples


def run_study(cfg: DictConfig) -> Path:
    study = cfg.study
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    teacher, teacher_note = teacher_checkpoint(cfg, run_dir)
    print(f"[study] teacher: {teacher_note}")
    rows, grids = [], {}
    for steps in study.teacher_steps:
        metrics, samples = evaluate(cfg, teacher, steps)
        rows.append({"method": "teacher", "steps": int(steps), "noise_input": "", **flatten(metrics)})
        grids[f"teacher, {steps} steps"] = samples
        print(f"[study] teacher @ {steps} steps: {rows[-1]}")
    for noise in study.noise_input:
        for steps in study.student_steps:
            fitted = run.fit(student_config(cfg, teacher, steps, noise, run_dir))
            if fitted is None:
                raise UserError("student training was interrupted; its crash.ckpt is in the student folder")
            metrics, samples = evaluate(cfg, fitted.checkpoint, steps)
            label = LABELS[noise]
            rows.append({"method": label, "steps": int(steps), "noise_input": fitted.algo.settings.noise_input, **flatten(metrics),
                         "gen_output_entropy": fitted.algo.mean_gen_entropy(), "train_minutes": round(fitted.minutes, 2)})
            grids[f"{label}, {steps} steps"] = samples
            print(f"[study] {label} @ {steps} steps: {rows[-1]}")
    write_outputs(run_dir, cfg, rows, grids, teacher_note)
    print(f"[study] written to {run_dir}")
    return run_dir


def flatten(metrics: dict[str, dict]) -> dict[str, float]:
    """{"frechet": {"value": v, "stderr": e}} → {"frechet": v, "frechet_stderr": e}."""
    flat = {}
    for name, result in metrics.items():
        flat[name] = result["value"]
        if result.get("stderr") == result.get("stderr"):  # not NaN
            flat[f"{name}_stderr"] = result["stderr"]
    return flat


def write_outputs(run_dir: Path, cfg: DictConfig, rows: list[dict], grids: dict[str, torch.Tensor], teacher_note: str) -> None:
    first = ["method", "steps", "noise_input"]
    columns = first + sorted({k for row in rows for k in row} - set(first))
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Teacher vs D-MMD students on {cfg.data.name}",
        "",
        f"Teacher: {cfg.algo.name}, {teacher_note}. Students: {int(cfg.study.student_max_steps)} updates each. "
        f"Each row: {int(cfg.study.num_samples)} samples, seed {int(cfg.sampling.seed)}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    lines += ["", "Samples: `samples.png`; first metric vs steps: `pareto.png`; numbers: `results.csv`.", ""]
    (run_dir / "report.md").write_text("\n".join(lines), encoding="utf-8")
    from mdlm_dmmd.data import build_data

    if build_data(cfg.data, cfg.model.length).modality == "image":
        save_panels(grids, run_dir / "samples.png")
    metric = (cfg.eval.metrics or ["entropy"])[0]
    save_pareto(rows, metric, run_dir / "pareto.png")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def save_panels(grids: dict[str, torch.Tensor], path: Path, per_panel: int = 36) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mdlm_dmmd.data.images import image_grid

    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 3.0), squeeze=False)
    for ax, (label, samples) in zip(axes[0], grids.items()):
        ax.imshow(image_grid(samples[:per_panel], nrow=6))
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_pareto(rows: list[dict], metric: str, path: Path) -> None:
    """`metric` against steps, one line per method (eval/plots.py, shared with mode=sweep)."""
    from mdlm_dmmd.eval.plots import metric_vs_steps

    metric_vs_steps(rows, metric, path, group="method")
