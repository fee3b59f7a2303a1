"""mode=eval: sample a checkpoint and score the samples with `eval.metrics` on the data it was
trained on (or on `data=`: `data_from`, resolved by the CLI); run_dir gets the
samples (as mode=sample writes them), `metrics.json` and `report.md`. Under `torchrun` the
processes share the sample batches and rank 0 scores and writes (`ranks`)."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from mdlm_dmmd.eval.scoring import (check_metrics_ready, checkpoint_data, data_row, load_pipeline, nfe_report,
                                    sample_and_score, sampling_steps, with_checkpoint_data)
from mdlm_dmmd.eval.tables import write_report
from mdlm_dmmd.ranks import join
from mdlm_dmmd.training import check_run_dir, make_run_dir


def run(cfg: DictConfig) -> None:
    check_run_dir(cfg)  # before sampling, which may take long
    pipeline, path = load_pipeline(cfg)
    deferred = cfg.data_from == "checkpoint"  # the CLI left the metrics' check until the data was known
    cfg = with_checkpoint_data(cfg, pipeline.meta)
    if deferred:
        check_metrics_ready(cfg)
    steps = sampling_steps(cfg, pipeline.meta)
    ranks = join(pipeline.device)
    scored = sample_and_score(pipeline, cfg, steps, progress=True, ranks=ranks)
    if not ranks.writer:
        return
    rows = {"checkpoint": path, "sampling steps": steps, **nfe_report(pipeline.sampler, pipeline.length, steps, cfg),
            "samples": len(scored.samples), "data": data_row(cfg)}
    if cfg.sampling.get("entropy_redraw"):
        rows["entropy re-draws (BD3-LM's rule)"] = pipeline.stats.get("entropy_redraws", 0)
    if scored.prompt_rows is not None:
        rows["prompt length"] = int(cfg.sampling.prompt_length)
    rows.update(scored.metrics)
    data = checkpoint_data(cfg, pipeline.meta, scored.samples.shape[1])
    run_dir = make_run_dir(cfg)
    files = data.write_samples(run_dir, scored.samples)
    write_report(run_dir, f"evaluation of {path}", rows, files)
    print(json.dumps(rows, indent=2, default=str))
