"""mode=sweep: checkpoints × sampling steps × top-p, scored with `eval.metrics`.

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

A row keeps the distillation top-p of a student apart from its sampling top-p (`eval/sweep/plan.py`);
rows are written to `results.csv`, `results.md` and pictures (`eval/sweep/output.py`), and for
image data the first 64 samples of every row to `grids/<method>_<steps>steps_p<top-p>.png`. The judge
is never judged: a `gradient_moment` or `gen_ppl` reference that is one of the evaluated
checkpoints (the AR baseline included) is refused (`eval/sweep/judges.py`).

Everything (config, paths, checkpoints, the CSV) is checked before run_dir is created, so a wrong
input leaves nothing behind; `results.csv` is rewritten after every row, so a long sweep that
dies keeps what it measured, and the same command run again (`sweep.resume`, on by default)
keeps those rows and measures only the missing ones. Under `torchrun` the processes share the
sample batches of each row (`ranks`); rank 0 alone scores and writes. A row is kept when its method, steps,
top-p values, temperature and checkpoint path match and the folder's `config.yaml` has the same
`data`, `sampling`, `eval` and `sweep.num_samples`; other settings there are an error, never a
silent mix (a checkpoint retrained at the same path is not noticed: use `sweep.resume=false`).
A job that repeats an earlier one (the same checkpoint, steps, top-p and temperature under
another method name, e.g. a teacher's step row and its top-p sweep at one step count) is not
sampled again: with the same seed it would give the same numbers. Training the checkpoints is
`mode=train` / `mode=study`'s job.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from mdlm_dmmd.errors import UserError
from mdlm_dmmd.eval.scoring import default_device, describe
from mdlm_dmmd.eval.sweep import output, plan
from mdlm_dmmd.eval.sweep.config import check_config, reject_training_run_dir
from mdlm_dmmd.eval.sweep.judges import check_judges
from mdlm_dmmd.eval.sweep.literature import metric_columns, read_literature
from mdlm_dmmd.eval.sweep.resume import measured_rows, resume_key
from mdlm_dmmd.ranks import join
from mdlm_dmmd.training import make_run_dir

logger = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path:
    # 1. check everything before anything is written
    entries, problems = check_config(cfg)
    if problems:
        raise UserError("; ".join(problems))
    evaluated = {f"sweep.methods.{i}.checkpoint": e["checkpoint"] for i, e in enumerate(entries)}
    if cfg.sweep.get("ar_baseline") is not None:
        evaluated["sweep.ar_baseline"] = str(cfg.sweep.ar_baseline)
    check_judges(cfg, evaluated)
    run_dir = Path(cfg.run_dir)
    reject_training_run_dir(run_dir)
    metrics = list(cfg.eval.get("metrics") or [])
    quoted = read_literature(str(cfg.sweep.literature_csv), metrics) if cfg.sweep.get("literature_csv") else []
    methods, ar, length = plan.load_methods(cfg, entries)
    jobs = plan.jobs(methods, ar)
    plan.check_unique([plan.row_keys(m, s, p) for m, s, p in jobs] + quoted)
    columns = metric_columns(metrics, quoted)
    done = measured_rows(cfg, run_dir)
    device = default_device(cfg)
    ranks = join(device)
    ranks.barrier()  # every process has read results.csv before rank 0 rewrites it: all keep the same rows

    # 2. sample and score, one row at a time (results.csv rewritten after each)
    run_dir = make_run_dir(cfg)
    writer = ranks.writer
    rows: list[dict] = []
    measured: dict[tuple, dict] = {}
    data_row = bool(cfg.sweep.reference_rows) and not cfg.sampling.get("prompt_length")
    with tqdm(total=len(jobs) + int(data_row), desc="sweep", unit="row", disable=not writer) as bar:
        for i, (method, steps, top_p) in enumerate(jobs):
            bar.set_postfix_str(f"{method.name}, {steps} steps, top-p {top_p:g}")
            keys, job = plan.row_keys(method, steps, top_p), plan.job_key(method, steps, top_p)
            kept = done.get(resume_key(keys))
            twin = measured.get(job)  # same checkpoint, steps, top-p, temperature and seed
            if kept is not None:
                rows.append(kept)
            elif twin is not None:
                rows.append({**twin, **keys})
                twin_grid = plan.grid_path(cfg, twin["method"], steps, top_p)
                if writer and twin_grid.is_file():  # the same samples: the same picture under this row's name
                    shutil.copyfile(twin_grid, plan.grid_path(cfg, method.name, steps, top_p))
            else:
                method.pipeline.network.to(device)
                rows.append(plan.measure(cfg, method, steps, top_p, ranks=ranks))
            if all(method is not later for later, _, _ in jobs[i + 1:]):
                method.pipeline.network.to("cpu")  # done with it (measured or not): free the accelerator
            measured.setdefault(job, rows[-1])
            origin = "kept from results.csv" if kept else "same draw as an earlier row" if twin else "measured"
            if writer:
                logger.info("sweep (%s): %s", origin, rows[-1])
                output.write_csv(run_dir, rows + quoted, output.all_metrics(columns, rows))
            bar.update()
        if not writer:  # the other processes helped sample; rank 0 scores the data and writes
            return run_dir
        if data_row:  # (prompted sampling: no second data continuation of a prompt exists)
            bar.set_postfix_str("Data (held-out sequences)")
            rows.append(done.get(resume_key(plan.data_row_keys(cfg))) or plan.measure_data(cfg, length))
            output.write_csv(run_dir, rows + quoted, output.all_metrics(columns, rows))
            bar.update()
    rows += quoted
    columns = output.all_metrics(columns, rows)

    # 3. tables and pictures
    for row in rows:
        row["label"] = output.row_label(row)
    output.write_csv(run_dir, rows, columns)
    pictures = output.write_plots(run_dir, rows, columns, {m: describe(cfg, m) for m in metrics})
    output.write_markdown(run_dir, cfg, rows, columns, pictures, length)
    print(f"sweep written to {run_dir} (results.csv, results.md, {', '.join(pictures)})")
    return run_dir
