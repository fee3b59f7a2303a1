"""mode=sample: sample a checkpoint (this package's `.ckpt`, an exported directory, or a public
MDLM/Duo directory) and write `samples.pt` with `samples.png` or `samples.txt` to run_dir.
Under `torchrun` the processes share the sample batches and rank 0 writes (`ranks`)."""

from __future__ import annotations

from omegaconf import DictConfig

from mdlm_dmmd.eval.scoring import (checkpoint_data, generate, load_pipeline, prompt_rows, sampling_steps,
                                    with_checkpoint_data)
from mdlm_dmmd.ranks import join
from mdlm_dmmd.training import check_run_dir, make_run_dir


def run(cfg: DictConfig) -> None:
    check_run_dir(cfg)  # before sampling, which may take long
    pipeline, _ = load_pipeline(cfg)
    cfg = with_checkpoint_data(cfg, pipeline.meta)  # prompts from the data it was trained on (data_from)
    ranks = join(pipeline.device)
    samples = generate(pipeline, cfg, sampling_steps(cfg, pipeline.meta), prompt_rows=prompt_rows(cfg, pipeline.length),
                       ranks=ranks)
    if not ranks.writer:
        return
    data = checkpoint_data(cfg, pipeline.meta, samples.shape[1])
    run_dir = make_run_dir(cfg)
    files = data.write_samples(run_dir, samples)
    print(f"{len(samples)} samples written to {run_dir} ({', '.join(files)})")
