"""Gradient moment on bundled text: is GM zero for data, falling with steps, U-shaped in top-p?

Small-scale check of the paper's §5 metric (eqs. 13-14) with this package's own `ar` models as
the reference LMs, on the bundled Shakespeare corpus with a small BPE. The references never see
what they judge: they train on the second half of the training rows (`data.train_shard=[1,2]`,
one per seed of --reference-seeds, default 2 and 3), the judged models (masked teacher, AR
baseline; seed 1) and GM's data minibatches use the first half, and the "Data" row is the
held-out split.

1. train the reference ARs, a masked teacher (mdlm) and an AR baseline;
2. `mode=sweep`: teacher at 4/16/64/256 steps (top-p 1), teacher at 64 steps over top-p
   1.0 … 0.4, the AR baseline, and the held-out "Data" row — GM, gen-PPL and entropy under
   every AR reference (the first is the `gradient_moment`/`gen_ppl` column, each has its own
   `gm_<run>`/`gen_ppl_<run>` column: a verdict counts only if it holds under all of them);
3. GM of real text: training rows disjoint from GM's data rows (same distribution), the
   held-out plays, and the held-out rows shuffled within each row (far from the data).

Expected (paper §5, Fig. 3): same-distribution data ≈ 0 within its standard error, teacher GM
decreasing as steps grow, shuffled text far above; over top-p, gen-PPL falls monotonically
while GM is U-shaped.

    python benchmarks/gm_text.py [--steps 800] [--reference-seeds 2 3]
Writes benchmarks/results/gm_text_<time>/ (sweep tables and plots, data_rows_<samples>.json, run_info.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from mdlm_dmmd import cli

from run_info import run_info, train_or_reuse, write_run_info  # benchmarks/ is on sys.path as a script

COMMON = ["data=shakespeare", "data.tokenizer=bpe", "data.bpe_vocab_size=2048", "model.length=64",
          "model.hidden_dim=128", "model.cond_dim=64", "model.n_blocks=4", "model.n_heads=4", "model.dropout=0.0",
          "loader.batch_size=64", "optim.lr=1e-3", "optim.warmup_steps=100", "training.ema=0.999",
          "trainer.val_check_interval=400", "trainer.limit_val_batches=4", "trainer.enable_progress_bar=false",
          "sampling.num_samples=0"]


JUDGED_SHARD = "data.train_shard=[0,2]"  # teacher, AR baseline and GM's data minibatches
REFERENCE_SHARD = "data.train_shard=[1,2]"  # the reference LM only


def train(out: Path, name: str, algo: str, seed: int, steps: int, shard: str) -> Path:
    """Train (or, when `out/name` already holds a finished run, reuse) one model."""
    return train_or_reuse(out, name, [f"algo={algo}", *COMMON, shard, f"seed={seed}", f"trainer.max_steps={steps}"])


def data_rows_gm(references: list[Path], num: int) -> dict:
    """GM of three sets of real text against GM's data minibatches (random judged training rows).

    - "training rows": the next `num` rows of the same random order that picks the metric's data
      rows, so disjoint from them and from the same distribution: GM should be 0 within its s.e.;
    - "held-out split": the valid split (whole plays nobody trained on; a shift of distribution);
    - "shuffled held-out": those rows with their tokens shuffled within each row: far from data.
    """
    from mdlm_dmmd.data import build_data
    from mdlm_dmmd.metrics.gradient_moment import gradient_moment_metric

    cfg = cli.compose([*COMMON, JUDGED_SHARD])
    data = build_data(cfg.data, 64)
    train_order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))  # the metric's seed 0
    if len(train_order) < 2 * num:
        raise SystemExit(f"--samples {num}: the judged shard has only {len(train_order)} rows")
    g = torch.Generator().manual_seed(0)
    valid = torch.stack([data.valid[i]["input_ids"] for i in torch.randperm(len(data.valid), generator=g)[:num].tolist()])
    sets = {
        "training rows": torch.stack([data.train[int(i)]["input_ids"] for i in train_order[num: 2 * num]]),
        "held-out split": valid,
        "shuffled held-out": torch.stack([row[torch.randperm(len(row), generator=g)] for row in valid]),
    }
    results = {}
    for name, rows in sets.items():
        result = gradient_moment_metric(rows, data_config=cfg.data, reference=[str(r) for r in references],
                                        batch_size=8)
        results[name] = {k: result[k] for k in ("value", "stderr", "num_pairs")} | {"columns": result.get("columns", {})}
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="optimiser steps for the reference ARs and the teacher")
    parser.add_argument("--samples", type=int, default=256, help="samples per sweep row")
    parser.add_argument("--reference-seeds", type=int, nargs="+", default=[2, 3],
                        help="one reference AR per seed, all on the reference shard; the first is primary")
    parser.add_argument("--out", type=Path, default=None, help="results folder; finished trainings in it are reused")
    parser.add_argument("--data-rows-only", action="store_true",
                        help="only the real-text rows (data_rows_<samples>.json), with the references in --out")
    args = parser.parse_args()
    started = time.time()
    out = args.out or Path("benchmarks/results") / f"gm_text_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
    references = [train(out, f"reference_ar_seed{seed}", "ar", seed=seed, steps=args.steps, shard=REFERENCE_SHARD)
                  for seed in args.reference_seeds]
    if args.data_rows_only:
        rows = data_rows_gm(references, args.samples)
        (out / f"data_rows_{args.samples}.json").write_text(json.dumps(rows, indent=2))
        seeds = " ".join(map(str, args.reference_seeds))
        command = f"python benchmarks/gm_text.py --data-rows-only --samples {args.samples} --reference-seeds {seeds} --out {out}"
        write_run_info(out / f"data_rows_{args.samples}", run_info(command, started, data_rows_gm=rows))
        return
    teacher = train(out, "teacher_mdlm", "mdlm", seed=1, steps=args.steps, shard=JUDGED_SHARD)
    ar_baseline = train(out, "ar_baseline", "ar", seed=1, steps=args.steps, shard=JUDGED_SHARD)
    metrics = "eval.metrics=[gradient_moment,gen_ppl,entropy]"
    listed = "[" + ", ".join(f"'{r}'" for r in references) + "]"
    options = (f"eval.metric_options={{gradient_moment: {{reference: {listed}, batch_size: 8}}, "
               f"gen_ppl: {{reference: {listed}, batch_size: 32}}}}")
    methods = (f"sweep.methods=[{{name: 'Masked teacher', checkpoint: '{teacher}', steps: [4, 16, 64, 256], top_p: [1.0]}}, "
               f"{{name: 'Masked teacher, 64 steps', checkpoint: '{teacher}', steps: [64], top_p: [1.0, 0.95, 0.9, 0.8, 0.6, 0.4]}}]")
    code = cli.main(["mode=sweep", *COMMON, JUDGED_SHARD, metrics, options, methods, f"sweep.num_samples={args.samples}",
                     f"sweep.ar_baseline={ar_baseline}",
                     "sampling.num_samples=1", "sampling.batch_size=256", f"run_dir={out / 'sweep'}"])
    rows = data_rows_gm(references, args.samples)
    (out / f"data_rows_{args.samples}.json").write_text(json.dumps(rows, indent=2))
    seeds = " ".join(map(str, args.reference_seeds))
    command = f"python benchmarks/gm_text.py --steps {args.steps} --samples {args.samples} --reference-seeds {seeds} --out {out}"
    write_run_info(out, run_info(command, started, sweep_exit_code=code, data_rows_gm=rows))

if __name__ == "__main__":
    main()
