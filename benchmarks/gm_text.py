"""Gradient moment on bundled text: is GM zero for data, falling with steps, U-shaped in top-p?

Small-scale check of the paper's §5 metric (eqs. 13-14) with this package's own `ar` model as
the reference LM, on the bundled Shakespeare corpus with a small BPE. The reference never sees
what it judges: it trains on the second half of the training rows (`data.train_shard=[1,2]`,
seed 2), the judged models (masked teacher, AR baseline; seed 1) and GM's data minibatches use
the first half, and the "Data" row is the held-out split.

1. train the reference AR, a masked teacher (mdlm) and an AR baseline;
2. `mode=sweep`: teacher at 4/16/64/256 steps (top-p 1), teacher at 64 steps over top-p
   1.0 … 0.4, the AR baseline, and the held-out "Data" row — GM, gen-PPL and entropy with the
   AR reference;
3. GM of within-row shuffled held-out text (far from the data: GM should be large).

Expected (paper §5, Fig. 3): data ≈ 0 within its standard error, teacher GM decreasing as steps
grow, shuffled text far above; over top-p, gen-PPL falls monotonically while GM is U-shaped.

    python benchmarks/gm_text.py [--steps 800]
Writes benchmarks/results/gm_text_<time>/ (sweep tables and plots, shuffled.json, run_info.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from mdlm_dmmd import cli

from run_info import run_info, write_run_info  # benchmarks/ is on sys.path when run as a script

COMMON = ["data=shakespeare", "data.tokenizer=bpe", "data.bpe_vocab_size=2048", "model.length=64",
          "model.hidden_dim=128", "model.cond_dim=64", "model.n_blocks=4", "model.n_heads=4", "model.dropout=0.0",
          "loader.batch_size=64", "optim.lr=1e-3", "optim.warmup_steps=100", "training.ema=0.999",
          "trainer.val_check_interval=400", "trainer.limit_val_batches=4", "trainer.enable_progress_bar=false",
          "sampling.num_samples=0"]


JUDGED_SHARD = "data.train_shard=[0,2]"  # teacher, AR baseline and GM's data minibatches
REFERENCE_SHARD = "data.train_shard=[1,2]"  # the reference LM only


def train(out: Path, name: str, algo: str, seed: int, steps: int, shard: str) -> Path:
    """Train (or, when `out/name` already holds a finished run, reuse) one model."""
    run_dir = out / name
    if (run_dir / "checkpoints" / "final.ckpt").is_file():
        return run_dir / "checkpoints" / "final.ckpt"
    code = cli.main([f"algo={algo}", *COMMON, shard, f"seed={seed}", f"trainer.max_steps={steps}", f"run_dir={run_dir}"])
    if code != 0:
        raise SystemExit(f"training {name} failed")
    return run_dir / "checkpoints" / "final.ckpt"


def shuffled_gm(reference: Path, num: int) -> dict:
    """GM of held-out rows with their tokens shuffled within each row vs the judged training rows."""
    from mdlm_dmmd.data import build_data
    from mdlm_dmmd.metrics.gradient_moment import gradient_moment_metric

    cfg = cli.compose([*COMMON, JUDGED_SHARD])
    valid = build_data(cfg.data, 64).valid
    g = torch.Generator().manual_seed(0)
    rows = torch.stack([valid[i]["input_ids"] for i in torch.randperm(len(valid), generator=g)[:num].tolist()])
    shuffled = torch.stack([row[torch.randperm(len(row), generator=g)] for row in rows])
    result = gradient_moment_metric(shuffled, data_config=cfg.data, reference=str(reference), batch_size=8)
    return {k: result[k] for k in ("value", "stderr", "num_pairs")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="optimiser steps for the reference AR and the teacher")
    parser.add_argument("--samples", type=int, default=256, help="samples per sweep row")
    parser.add_argument("--out", type=Path, default=None, help="results folder; finished trainings in it are reused")
    args = parser.parse_args()
    started = time.time()
    out = args.out or Path("benchmarks/results") / f"gm_text_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
    reference = train(out, "reference_ar", "ar", seed=2, steps=args.steps, shard=REFERENCE_SHARD)
    teacher = train(out, "teacher_mdlm", "mdlm", seed=1, steps=args.steps, shard=JUDGED_SHARD)
    ar_baseline = train(out, "ar_baseline", "ar", seed=1, steps=args.steps, shard=JUDGED_SHARD)
    metrics = "eval.metrics=[gradient_moment,gen_ppl,entropy]"
    options = (f"eval.metric_options={{gradient_moment: {{reference: '{reference}', batch_size: 8}}, "
               f"gen_ppl: {{reference: '{reference}', batch_size: 32}}}}")
    methods = (f"sweep.methods=[{{name: 'Masked teacher', checkpoint: '{teacher}', steps: [4, 16, 64, 256], top_p: [1.0]}}, "
               f"{{name: 'Masked teacher, 64 steps', checkpoint: '{teacher}', steps: [64], top_p: [1.0, 0.95, 0.9, 0.8, 0.6, 0.4]}}]")
    code = cli.main(["mode=sweep", *COMMON, JUDGED_SHARD, metrics, options, methods, f"sweep.num_samples={args.samples}",
                     f"sweep.ar_baseline={ar_baseline}",
                     "sampling.num_samples=1", "sampling.batch_size=256", f"run_dir={out / 'sweep'}"])
    shuffled = shuffled_gm(reference, args.samples)
    (out / "shuffled.json").write_text(json.dumps(shuffled, indent=2))
    command = f"python benchmarks/gm_text.py --steps {args.steps} --samples {args.samples} --out {out}"
    write_run_info(out, run_info(command, started, sweep_exit_code=code, shuffled_rows_gm=shuffled))

if __name__ == "__main__":
    main()
