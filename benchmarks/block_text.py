"""Table 3 at toy scale: a uniform block teacher and its 16-step-per-block D-MMD student on text.

The paper's §6.3 / Table 3 on CPU: bundled Shakespeare with a 2048-token BPE, a uniform BD3-LM
teacher (length 256 in blocks of 64 by default: length 1024 in blocks of 256 does not fit a few
CPU hours; `--length 1024 --block-size 256` runs the paper's shape), scored at 16/64/256 steps per
block with top-p 0.9, and a D-MMD student with 16 steps per block distilled and sampled with
top-p 0.7; gradient moment and gen-PPL under two `ar` reference LMs trained on the other half of
the training rows (seeds 2, 3; the judged models never see it), and sample entropy, ± s.e.
Expected (Table 3): the 16-step student matches the 256-step teacher in GM.

1. train the references, the block teacher and the student (finished runs in --out are reused);
2. `mode=sweep`: teacher rows, the student row (its own 16 steps), the held-out Data row.

    python benchmarks/block_text.py [--length 256 --block-size 64 --teacher-steps 3000 --student-steps 1500]
Writes benchmarks/results/block_text_<time>/ (sweep tables and plots, run_info.json).
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from mdlm_dmmd import cli

from run_info import run_info, train_or_reuse as train, write_run_info  # benchmarks/ is on sys.path as a script

MODEL = ["model.hidden_dim=128", "model.cond_dim=64", "model.n_blocks=4", "model.n_heads=4", "model.dropout=0.0"]
DATA = ["data=shakespeare", "data.tokenizer=bpe", "data.bpe_vocab_size=2048"]
TRAINING = ["loader.batch_size=32", "optim.lr=1e-3", "optim.warmup_steps=100", "training.ema=0.999",
            "trainer.val_check_interval=500", "trainer.limit_val_batches=4", "trainer.enable_progress_bar=false",
            "sampling.num_samples=0"]
JUDGED_SHARD = "data.train_shard=[0,2]"  # teacher, student and GM's data minibatches
REFERENCE_SHARD = "data.train_shard=[1,2]"  # the reference LMs only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--teacher-steps", type=int, default=3000)
    parser.add_argument("--student-steps", type=int, default=1500, help="generator + auxiliary updates")
    parser.add_argument("--reference-steps", type=int, default=1500)
    parser.add_argument("--teacher-grid", type=int, nargs="+", default=[16, 64, 256], help="teacher steps per block")
    parser.add_argument("--student-k", type=int, default=16, help="student steps per block")
    parser.add_argument("--samples", type=int, default=256, help="samples per sweep row")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.time()
    out = args.out or Path("benchmarks/results") / f"block_text_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
    shape = [f"model.length={args.length}"]

    references = [train(out, f"reference_ar_seed{seed}", ["algo=ar", *DATA, *MODEL, *TRAINING, *shape, REFERENCE_SHARD,
                                                           f"seed={seed}", f"trainer.max_steps={args.reference_steps}"])
                  for seed in (2, 3)]
    teacher = train(out, "teacher_bd3lm_uniform", [
        "algo=bd3lm", "algo.process=uniform", f"block_size={args.block_size}", *DATA, *MODEL, *TRAINING, *shape,
        JUDGED_SHARD, "seed=1", f"trainer.max_steps={args.teacher_steps}"])
    student = train(out, f"dmmd_k{args.student_k}", [
        "algo=dmmd", f"algo.teacher={teacher}", f"algo.sampling_steps={args.student_k}", "algo.teacher_top_p=0.7",
        "algo.lr_generator=1e-4", "algo.lr_aux=3e-4", *DATA, *TRAINING, *shape, JUDGED_SHARD, "seed=1",
        "optim.warmup_steps=0", f"trainer.max_steps={args.student_steps}"])

    listed = "[" + ", ".join(f"'{r}'" for r in references) + "]"
    options = (f"eval.metric_options={{gradient_moment: {{reference: {listed}, batch_size: 8}}, "
               f"gen_ppl: {{reference: {listed}, batch_size: 32}}}}")
    grid = ", ".join(map(str, args.teacher_grid))
    methods = (f"sweep.methods=[{{name: 'Uniform block teacher', checkpoint: '{teacher}', steps: [{grid}], top_p: [0.9]}}, "
               f"{{name: 'Uniform block D-MMD', checkpoint: '{student}', steps: null, top_p: [0.7], distill_top_p: 0.7}}]")
    code = cli.main(["mode=sweep", *DATA, *shape, JUDGED_SHARD, "eval.metrics=[gradient_moment,gen_ppl,entropy]",
                     options, methods, f"sweep.num_samples={args.samples}", "sampling.num_samples=1",
                     "sampling.batch_size=64", f"run_dir={out / 'sweep'}"])
    argv = (f"--length {args.length} --block-size {args.block_size} --teacher-steps {args.teacher_steps} "
            f"--student-steps {args.student_steps} --reference-steps {args.reference_steps} "
            f"--teacher-grid {grid.replace(',', '')} --student-k {args.student_k} --samples {args.samples} --out {out}")
    write_run_info(out, run_info(f"python benchmarks/block_text.py {argv}", started, sweep_exit_code=code))


if __name__ == "__main__":
    main()
