"""The paper's Table 5 at CPU scale: D-MMD vs SDTT vs IDLM vs the teacher, on text and on digits.

One masked teacher per task, and every method distilled from it with the same host, data and
number of optimiser updates (`--student-steps`; generator and auxiliary/fake updates both count):

- D-MMD students at k = 4, 8, 16 (noise input on, the two-rate default of the quickstart);
- SDTT (kl_bwd) from `--sdtt-initial` steps down to the smallest k, one round every
  student_steps / rounds updates; every round's student is scored at its own k;
- IDLM, one student sampled at 4, 8, 16 steps (the official single rate for generator and fake
  model), and one with the fake model at 3x the generator's rate (D-MMD's two-rate setting).

text (bundled Shakespeare, 2048-token BPE, 64 tokens; the teacher and the two reference ARs of
`--reuse`, by default benchmarks/results/gm_text_2refs_2026-12-05): top-p protocol of the paper's
§6.4: p* = the teacher's GM-minimising sampling top-p at 64 steps in that run's sweep; the teacher
is scored at 4..256 steps at p* and at p = 1; D-MMD is distilled with teacher top-p p* (§3.3)
and sampled at p = 1, plus one 8-step student distilled at p = 1; SDTT and IDLM students are
sampled at p* (our assumption: the teacher's p) and at p = 1. Metrics: gradient moment and
gen-PPL under both reference ARs, sample entropy, each ± s.e.

digits (the teacher of `--reuse-digits`, by default benchmarks/results/dmmd_digits_robust_2026-12-05):
the same methods at 4/8/16 steps, Fréchet distance (and KID) in both classifier feature spaces
and sample entropy; no top-p.

    python benchmarks/baselines.py text   [--student-steps 300 --samples 256 --out DIR]
    python benchmarks/baselines.py digits [--student-steps 400 --samples 1000 --out DIR]
Finished trainings in --out are reused. Writes the sweep tables and plots, run_info.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import time
from pathlib import Path

from mdlm_dmmd import cli

from run_info import run_info, train_or_reuse as train, write_run_info  # benchmarks/ is on sys.path as a script

TEXT = ["data=shakespeare", "data.tokenizer=bpe", "data.bpe_vocab_size=2048", "model.length=64",
        "data.train_shard=[0,2]"]  # the judged half: teacher, students and GM's data minibatches
DIGITS = ["data=digits", "model.length=64"]
STUDENT = ["loader.batch_size=64", "optim.warmup_steps=0", "training.ema=0.999", "trainer.val_check_interval=100",
           "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", "sampling.num_samples=0", "seed=1"]
RATES = {"dmmd": ["algo.lr_generator=1e-4", "algo.lr_aux=3e-4"],  # the quickstart's CPU rates
         "idlm": ["algo.lr_generator=1e-4", "algo.lr_fake=1e-4"],  # the official code: one rate for both
         "sdtt": ["optim.lr=1e-4"]}
KS = (4, 8, 16)


def chosen_top_p(sweep_csv: Path) -> float:
    """p*: the sampling top-p with the lowest primary GM among the 64-step teacher rows of a sweep."""
    with open(sweep_csv) as f:
        rows = [r for r in csv.DictReader(f) if r["method"].startswith("Masked teacher") and r["steps"] == "64"]
    best = min(rows, key=lambda r: float(r["gradient_moment"]))
    return float(best["top_p"])


def students(out: Path, data: list[str], teacher: Path, steps: int, sdtt_initial: int, top_p: float | None) -> dict:
    """Train every method's students; {label: checkpoint or list of round checkpoints}."""
    common = [*data, *STUDENT, f"algo.teacher={teacher}"]
    limit = f"trainer.max_steps={steps}"
    made = {}
    for k in KS:
        distill = [] if top_p is None else [f"algo.teacher_top_p={top_p}"]
        made[f"dmmd_k{k}"] = train(out, f"dmmd_k{k}", ["algo=dmmd", f"algo.sampling_steps={k}", *RATES["dmmd"],
                                                       *distill, *common, limit])
    if top_p is not None:  # the p = 1.0 distillation row
        made["dmmd_k8_p1"] = train(out, "dmmd_k8_p1", ["algo=dmmd", "algo.sampling_steps=8", *RATES["dmmd"], *common, limit])
    rounds = int(math.log2(sdtt_initial // min(KS)))
    sdtt = train(out, "sdtt", ["algo=sdtt", f"algo.initial_steps={sdtt_initial}", f"algo.final_steps={min(KS)}",
                               f"algo.steps_per_round={steps // rounds}", *RATES["sdtt"], *common,
                               f"trainer.max_steps={steps + 1}"])  # the step after the last round saves it
    made["sdtt_rounds"] = sorted(sdtt.parent.glob("round*_k*.ckpt"), key=lambda p: int(p.stem.split("round")[1].split("_")[0]))
    made["idlm"] = train(out, "idlm", ["algo=idlm", *RATES["idlm"], *common, limit])
    # IDLM with D-MMD's two-rate setting (fake model 3x the generator's rate): a sensitivity row,
    # since D-MMD's auxiliary model needed it on digits (benchmarks/results/README.md)
    made["idlm_fake3x"] = train(out, "idlm_fake3x", ["algo=idlm", "algo.lr_generator=1e-4", "algo.lr_fake=3e-4",
                                                     *common, limit])
    return made


def methods_text(teacher: Path, made: dict, p: float) -> str:
    grid = "[4, 8, 16, 32, 64, 256]"
    entries = [f"{{name: 'Masked teacher', checkpoint: '{teacher}', steps: {grid}, top_p: [{p}, 1.0]}}"]
    entries += [f"{{name: 'D-MMD', checkpoint: '{made[f'dmmd_k{k}']}', steps: null, top_p: [1.0], distill_top_p: {p}}}"
                for k in KS]
    entries.append(f"{{name: 'D-MMD', checkpoint: '{made['dmmd_k8_p1']}', steps: null, top_p: [1.0], distill_top_p: 1.0}}")
    entries += [f"{{name: 'SDTT', checkpoint: '{ckpt}', steps: null, top_p: [{p}, 1.0]}}" for ckpt in made["sdtt_rounds"]]
    entries.append(f"{{name: 'IDLM', checkpoint: '{made['idlm']}', steps: [4, 8, 16], top_p: [{p}, 1.0]}}")
    entries.append(f"{{name: 'IDLM, fake rate 3x', checkpoint: '{made['idlm_fake3x']}', steps: [4, 8, 16], "
                   f"top_p: [{p}, 1.0]}}")
    return "sweep.methods=[" + ", ".join(entries) + "]"


def methods_digits(teacher: Path, made: dict) -> str:
    entries = [f"{{name: 'Masked teacher', checkpoint: '{teacher}', steps: [4, 8, 16, 32, 64]}}"]
    entries += [f"{{name: 'D-MMD', checkpoint: '{made[f'dmmd_k{k}']}', steps: null}}" for k in KS]
    entries += [f"{{name: 'SDTT', checkpoint: '{ckpt}', steps: null}}" for ckpt in made["sdtt_rounds"]]
    entries.append(f"{{name: 'IDLM', checkpoint: '{made['idlm']}', steps: [4, 8, 16]}}")
    entries.append(f"{{name: 'IDLM, fake rate 3x', checkpoint: '{made['idlm_fake3x']}', steps: [4, 8, 16]}}")
    return "sweep.methods=[" + ", ".join(entries) + "]"


TABLE_COLUMNS = {True: ["gm_reference_ar_seed2", "gm_reference_ar_seed3", "gen_ppl_reference_ar_seed2", "entropy"],
                 False: ["fd_digits_mlp", "fd_digits_cnn", "kid_digits_mlp", "entropy"]}


def write_table5(out: Path, text: bool) -> None:
    """out/table5.md: the sweep as Table 5 and the comparisons (benchmarks/table5.py)."""
    import table5

    rows = table5.read(out / "sweep" / "results.csv")
    columns = TABLE_COLUMNS[text]
    (out / "table5.md").write_text("\n".join(["## Table 5 shape: method × steps", "", *table5.table(rows, columns), "",
                                              "## Differences (row − reference, z = difference / combined s.e.)", "",
                                              *table5.comparisons(rows, columns), ""]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=["text", "digits"])
    parser.add_argument("--student-steps", type=int, default=None, help="optimiser updates per method (text 300, digits 400)")
    parser.add_argument("--samples", type=int, default=None, help="samples per row (text 256, digits 1000)")
    parser.add_argument("--sdtt-initial", type=int, default=None, help="SDTT round-0 teacher steps (text 256, digits 64)")
    parser.add_argument("--reuse", type=Path, default=Path("benchmarks/results/gm_text_2refs_2026-12-05"),
                        help="text: the folder with teacher_mdlm/, reference_ar_seed{2,3}/ and sweep/results.csv")
    parser.add_argument("--reuse-digits", type=Path, default=Path("benchmarks/results/dmmd_digits_robust_2026-12-05"),
                        help="digits: the folder with teacher/")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = args.task == "text"
    steps = args.student_steps or (300 if text else 400)
    samples = args.samples or (256 if text else 1000)
    sdtt_initial = args.sdtt_initial or (256 if text else 64)
    started = time.time()
    out = args.out or Path("benchmarks/results") / f"baselines_{args.task}_{datetime.datetime.now():%Y-%m-%d_%H-%M-%S}"
    if text:
        teacher = (args.reuse / "teacher_mdlm" / "checkpoints" / "final.ckpt").resolve()
        references = [(args.reuse / f"reference_ar_seed{s}" / "checkpoints" / "final.ckpt").resolve() for s in (2, 3)]
        p = chosen_top_p(args.reuse / "sweep" / "results.csv")
        print(f"[baselines] p* = {p} (the 64-step teacher's GM-minimising top-p in {args.reuse / 'sweep'})", flush=True)
        made = students(out, TEXT, teacher, steps, sdtt_initial, p)
        listed = "[" + ", ".join(f"'{r}'" for r in references) + "]"
        scoring = [*TEXT, "eval.metrics=[gradient_moment,gen_ppl,entropy]",
                   f"eval.metric_options={{gradient_moment: {{reference: {listed}, batch_size: 8}}, "
                   f"gen_ppl: {{reference: {listed}, batch_size: 32}}}}", methods_text(teacher, made, p)]
    else:
        teacher = (args.reuse_digits / "teacher" / "checkpoints" / "final.ckpt").resolve()
        p = None
        made = students(out, DIGITS, teacher, steps, sdtt_initial, None)
        scoring = [*DIGITS, "eval.metrics=[frechet,entropy]", "eval.metric_options={frechet: {num_bootstrap: 10}}",
                   methods_digits(teacher, made)]
    code = cli.main(["mode=sweep", *scoring, f"sweep.num_samples={samples}", "sampling.num_samples=1",
                     "sampling.batch_size=256", f"run_dir={out / 'sweep'}"])
    write_table5(out, text)
    argv = f"{args.task} --student-steps {steps} --samples {samples} --sdtt-initial {sdtt_initial} --out {out}"
    write_run_info(out, run_info(f"python benchmarks/baselines.py {argv}", started, sweep_exit_code=code,
                                 chosen_top_p=p, teacher=str(teacher)))


if __name__ == "__main__":
    main()
