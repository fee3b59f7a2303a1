"""What a sweep samples: its checkpoints loaded once each (`Method`), the jobs (method, steps,
top-p) in table order, and measuring one job or the "Data" row.

A row keeps two top-p values apart: `distill_top_p`, the teacher nucleus a D-MMD student was
distilled with (algo.teacher_top_p, paper §3.3; from the checkpoint when it records it, else
from the method's `distill_top_p`), and `top_p`, the nucleus it is sampled with. A job that
repeats an earlier one (the same checkpoint, steps, top-p and temperature under another method
name) gives the same numbers with the same seed: `job_key` says when.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.errors import UserError
from mdlm_dmmd.eval.scoring import (check_block_size, compute_metrics, flatten, held_out_rows, nfe_report,
                                    sample_and_score, with_sampling)
from mdlm_dmmd.eval.sweep.output import row_label
from mdlm_dmmd.pipeline import Pipeline
from mdlm_dmmd.ranks import Ranks


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


def _is_student(meta: CheckpointMeta) -> bool:
    return meta.teacher is not None  # students record their teacher (CE uniform teachers also use "generator")


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
            check_block_size(cfg, loaded[key], path)  # an explicit block_size must be each checkpoint's
        return loaded[key]

    problems, lengths = [], {}
    methods: list[Method] = []
    for i, entry in enumerate(entries):
        where, path = f"sweep.methods.{i}", entry["checkpoint"]
        pipeline = load(path)
        meta = pipeline.meta
        if pipeline.is_autoregressive:
            problems.append(f"{where}.checkpoint '{path}' is an autoregressive (`ar`) model; pass it as sweep.ar_baseline")
            continue
        steps = entry["steps"]
        if steps is None:
            own = meta.sampling_steps
            if own is None:
                problems.append(f"{where}.steps is null (the checkpoint's own k), but '{path}' is not a distilled "
                                f"student with a recorded k; list the steps, e.g. {where}.steps=[32,64]")
                continue
            steps = [int(own)]
        recorded, given = meta.teacher_top_p, entry["distill_top_p"]
        if given is not None and not _is_student(meta):
            problems.append(f"{where}.distill_top_p is for distilled students, but '{path}' is a "
                            f"{meta.algo or 'non-distilled'} checkpoint; remove it")
        elif recorded is not None and given is not None and abs(float(recorded) - float(given)) > 1e-9:
            problems.append(f"{where}.distill_top_p={given} contradicts the checkpoint, distilled with "
                            f"teacher_top_p={recorded}; remove it")
        problems += other_data(cfg, meta, f"{where}.checkpoint '{path}'")
        lengths[where] = pipeline.network.config.length
        distill_top_p = recorded if recorded is not None else given  # None: a teacher, or not known
        methods.append(Method(entry["name"], path, steps, [float(p) for p in entry["top_p"]], float(entry["temperature"]),
                              None if distill_top_p is None else float(distill_top_p), pipeline))
    ar = None
    ar_path = cfg.sweep.get("ar_baseline")
    if ar_path is not None:
        pipeline = load(str(ar_path))
        if not pipeline.is_autoregressive:
            problems.append(f"sweep.ar_baseline '{ar_path}' is a {pipeline.meta.process or 'diffusion'} "
                            f"diffusion checkpoint, not one of the `ar` algo")
        else:
            problems += other_data(cfg, pipeline.meta, f"sweep.ar_baseline '{ar_path}'")
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


def other_data(cfg: DictConfig, meta: CheckpointMeta, what: str) -> list[str]:
    """The refusal of a checkpoint trained on other data than the sweep scores against (none
    when it matches or the checkpoint does not say)."""
    trained_on = (meta.data or {}).get("name")
    if trained_on is None or trained_on == cfg.data.name:
        return []
    return [f"{what} was trained on data '{trained_on}' but the sweep scores against data={cfg.data.name}; "
            f"pass data={trained_on}"]


def jobs(methods: list[Method], ar: Method | None) -> list[tuple[Method, int, float]]:
    """(method, steps, top-p) of every measured row, in table order; the AR baseline last."""
    found = [(m, s, p) for m in methods for s in m.steps for p in m.top_p]
    if ar is not None:
        found.append((ar, ar.steps[0], ar.top_p[0]))
    return found


def check_unique(rows: list[dict]) -> None:
    """Two rows with one label and step count would fill one table cell twice."""
    seen = set()
    for row in rows:
        key = (row_label(row), row.get("steps"))
        if key in seen:
            raise UserError(f"the sweep would produce two rows '{key[0]}' at {key[1]} steps; "
                            f"give the sweep.methods entries different names or steps")
        seen.add(key)


def measure(cfg: DictConfig, method: Method, steps: int, top_p: float, ranks: Ranks = Ranks()) -> dict:
    """Sample one (method, steps, top-p) with `sweep.num_samples` and `sampling.seed`, and score it
    (with several `ranks`: they share the sampling; the others than rank 0 get the keys only)."""
    sampling_cfg = with_sampling(cfg, num_samples=int(cfg.sweep.num_samples), top_p=float(top_p),
                                 temperature=method.temperature)
    scored = sample_and_score(method.pipeline, sampling_cfg, int(steps), ranks=ranks)
    if not ranks.writer:
        return row_keys(method, steps, top_p)
    write_grid(method.pipeline, scored.samples, grid_path(cfg, method.name, steps, top_p))
    report = nfe_report(method.pipeline.sampler, method.pipeline.length, int(steps), sampling_cfg)
    return {**row_keys(method, steps, top_p), **flatten(scored.metrics),
            "num_samples": int(cfg.sweep.num_samples), "sample_seconds": round(scored.seconds, 3),
            "nfe": report.get("NFE (all blocks)", report.get("NFE", int(steps))),
            **({"entropy_redraws": method.pipeline.stats.get("entropy_redraws", 0)}
               if cfg.sampling.get("entropy_redraw") else {})}


def grid_path(cfg: DictConfig, name: str, steps: int, top_p: float) -> Path:
    """grids/<method>_<steps>steps_p<top-p>.png in the sweep's run_dir (image data)."""
    slug = "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in f"{name}_{int(steps)}steps_p{float(top_p):g}")
    return Path(cfg.run_dir) / "grids" / f"{slug}.png"


def write_grid(pipeline: Pipeline, samples, path: Path) -> None:
    """The first 64 samples of an image model as a picture at `path` (text: nothing)."""
    vocab = pipeline.meta.vocab or {}
    if vocab.get("modality") != "image" or not vocab.get("image_shape"):
        return
    from mdlm_dmmd.data.images import save_image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image_grid(samples[:64].cpu(), path, max_value=int(vocab["size"]) - 1, image_shape=vocab["image_shape"])


def job_key(method: Method, steps: int, top_p: float) -> tuple:
    # rows with equal keys sample the same checkpoint with the same seed: identical numbers
    return Path(method.checkpoint).resolve(), int(steps), float(top_p), float(method.temperature)


def row_keys(method: Method, steps: int, top_p: float) -> dict:
    return {"method": method.name, "source": "measured", "steps": int(steps),
            "distill_top_p": "" if method.distill_top_p is None else method.distill_top_p,
            "top_p": float(top_p), "temperature": method.temperature, "checkpoint": method.checkpoint}


def data_row_keys(cfg: DictConfig) -> dict:
    return {"method": "Data", "source": "data", "steps": "", "distill_top_p": "", "top_p": "", "temperature": "",
            "checkpoint": f"data={cfg.data.name} (valid split)"}


def measure_data(cfg: DictConfig, length: int) -> dict:
    """The "Data" row: `eval.metrics` of `sweep.num_samples` held-out sequences themselves."""
    rows = held_out_rows(cfg, length, int(cfg.sweep.num_samples))
    return {**data_row_keys(cfg), **flatten(compute_metrics(cfg, rows)), "num_samples": len(rows),
            "sample_seconds": ""}
