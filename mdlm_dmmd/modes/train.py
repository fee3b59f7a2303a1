"""mode=train: fit `cfg.algo` on `cfg.data`, then sample the trained model and write its report.

run_dir gets `config.yaml`, `checkpoints/` (periodic, `last`, `final`, and `crash.ckpt` if
training dies), `samples.pt` with `samples.png` (images) or `samples.txt` (text), `metrics.json`
and `report.md` (optimizer steps, validation NLL, sampling steps, `eval.metrics`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from mdlm_dmmd import ranks
from mdlm_dmmd.checkpoint_meta import CheckpointMeta
from mdlm_dmmd.eval.scoring import nfe_report, sample_and_score, sampling_steps
from mdlm_dmmd.eval.tables import write_report
from mdlm_dmmd.training import fit


def run(cfg: DictConfig) -> None:
    fitted = fit(cfg)
    if fitted is None:
        return
    together = ranks.hold()  # several processes: the others wait while rank 0 samples and writes
    try:
        if fitted.trainer.global_rank == 0:
            report(cfg, fitted)
    finally:
        ranks.release(together)


def report(cfg: DictConfig, fitted) -> None:
    """Sample the trained model, score it and write the run's report (rank 0)."""
    rows: dict[str, Any] = {"algo": cfg.algo.name, "data": cfg.data.name,
                            "optimizer steps": fitted.trainer.global_step, "train minutes": fitted.minutes}
    rows.update({k: float(v) for k, v in fitted.trainer.callback_metrics.items() if k.startswith("val/")})
    files = ["checkpoints/final.ckpt"]
    if int(cfg.sampling.num_samples) > 0:
        rows["sampling steps"] = sampling_steps(cfg, CheckpointMeta.from_dict(fitted.algo.checkpoint_meta()))
        rows.update(nfe_report(fitted.algo.sampler(), fitted.algo.length, rows["sampling steps"], cfg))
        scored = sample_and_score(fitted.algo, cfg, rows["sampling steps"], progress=True)
        rows.update(scored.metrics)
        files += fitted.data.write_samples(fitted.run_dir, scored.samples)
        fitted.data.log_samples(fitted.trainer.logger, scored.samples, fitted.trainer.global_step)
    write_report(fitted.run_dir, f"{cfg.algo.name} on {cfg.data.name}", rows, files)
    print(f"run written to {fitted.run_dir}")
