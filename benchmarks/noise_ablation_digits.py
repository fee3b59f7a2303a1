"""Table 6's noise ablation on 8x8 digits (CPU): masked D-MMD at k = 4 and 8 with the generator
noise input off, as white per-token noise, and as the 2D noise pyramid.

Every student distils the same cached teacher (the quickstart's, trained first if not cached) with the same update budget and
rates (the quickstart's two-rate default). Reported per variant and k: Fréchet distance ± bootstrap
s.e. in both digits feature spaces, KID, and the generator output entropy (mean per-position
entropy of the generator's x̂ at masked positions, logged while training), at the end and along
training (every saved checkpoint scored; entropy from the training log). Then Table 6's
qualitative claims are checked: noise input lowers FD, most at small k, and lowers the generator
output entropy. Digits FD is not CIFAR FID; only the direction of the effects is compared.

    python benchmarks/noise_ablation_digits.py [--updates 600] [--samples 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

from mdlm_dmmd import cli
from mdlm_dmmd.modes.study import teacher_checkpoint

import checkpoint_trajectory  # benchmarks/ is on sys.path when run as a script
from run_info import command_line, results_dir, run_info, write_results, write_run_info

VARIANTS = {  # name -> (study folder, study.noise_input value of its students)
    "off": ("study_pyramid_off", False),
    "pyramid": ("study_pyramid_off", True),
    "white": ("study_white", True),
}
STEPS = (4, 8)


def study(out: Path, folder: str, args, extra: list[str]) -> Path:
    run_dir = out / folder
    if not (run_dir / "results.csv").is_file():  # a finished study is kept (a rerun goes on where it stopped)
        code = cli.main(["experiment=dmmd_digits", f"run_dir={run_dir}", f"study.student_steps=[{','.join(map(str, STEPS))}]",
                         f"study.student_max_steps={args.updates}", f"study.num_samples={args.samples}",
                         f"trainer.val_check_interval={max(1, args.updates // 3)}", *extra])
        if code:
            raise SystemExit(f"study {folder} failed with exit code {code}")
    return run_dir


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def entropy_curve(run: Path) -> list[tuple[int, float]]:
    """(step, generator output entropy) from a student's training log."""
    points = []
    for row in read_csv(run / "logs" / "metrics.csv"):
        value = row.get("train/gen_entropy") or row.get("gen_entropy")
        if value:
            points.append((int(row["step"]), float(value)))
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=600, help="optimiser updates per student")
    parser.add_argument("--samples", type=int, default=1000, help="samples per scored row")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.time()
    out = args.out or results_dir("noise_ablation_digits")
    out.mkdir(parents=True, exist_ok=True)
    # the teacher first, trained (if not cached yet) with the quickstart's checkpoint interval: the
    # studies below save the students' checkpoints more often, for the trajectory
    teacher, how = teacher_checkpoint(cli.compose(["experiment=dmmd_digits"]), out / "teacher_run")
    print(f"teacher: {teacher} ({how})", flush=True)

    pyramid_off = study(out, "study_pyramid_off", args, ["study.teacher_steps=[4,8,64]", "study.noise_input=[true,false]"])
    white = study(out, "study_white", args, ["study.teacher_steps=[4]", "study.noise_input=[true]",
                                             "++study.student_overrides.noise_pyramid=false"])
    trajectory = out / "trajectory"
    if not (trajectory / "run_info.json").is_file():  # scored to the end once (rows are written as they come)
        checkpoint_trajectory.score_runs(trajectory, [pyramid_off, white], [f"study.num_samples={args.samples}"],
                                         exclude=("teacher",))
        write_run_info(trajectory, run_info(command_line("noise_ablation_digits.py", args), started))

    # ------------------------------------------------------------------ collect
    final = {}
    for variant, (folder, noise) in VARIANTS.items():
        for row in read_csv(out / folder / "results.csv"):
            if row["method"] != "teacher" and row["noise_input"] == str(noise):
                final[(variant, int(row["steps"]))] = row
    teacher = {int(r["steps"]): r for r in read_csv(pyramid_off / "results.csv") if r["method"] == "teacher"}
    along = read_csv(trajectory / "trajectory.csv")
    folder_names = {"off": "dmmd_k{k}_nonoise", "pyramid": "dmmd_k{k}_noise", "white": "dmmd_k{k}_noise"}

    lines = ["| variant | k | FD digits_mlp ± s.e. | FD digits_cnn ± s.e. | KID digits_mlp ± s.e. | gen. output entropy |",
             "|---|---|---|---|---|---|"]
    for k in STEPS:
        t = teacher[k]
        lines.append(f"| teacher | {k} | {float(t['frechet']):.1f} ± {float(t['frechet_stderr']):.1f} | "
                     f"{float(t['fd_digits_cnn']):.1f} ± {float(t['fd_digits_cnn_stderr']):.1f} | "
                     f"{float(t['kid_digits_mlp']):.2f} ± {float(t['kid_digits_mlp_stderr']):.2f} | |")
        for variant in VARIANTS:
            r = final[(variant, k)]
            lines.append(f"| {variant} | {k} | {float(r['frechet']):.1f} ± {float(r['frechet_stderr']):.1f} | "
                         f"{float(r['fd_digits_cnn']):.1f} ± {float(r['fd_digits_cnn_stderr']):.1f} | "
                         f"{float(r['kid_digits_mlp']):.2f} ± {float(r['kid_digits_mlp_stderr']):.2f} | "
                         f"{float(r['gen_output_entropy']):.3f} |")
    lines += ["", f"64-step teacher: FD {float(teacher[64]['frechet']):.1f} ± {float(teacher[64]['frechet_stderr']):.1f}", "",
              "Along training (FD digits_mlp of the EMA generator at each saved checkpoint; generator output "
              "entropy: mean of the logged values over the 50 updates before it):", "",
              "| variant | k | updates | FD digits_mlp | gen. output entropy |", "|---|---|---|---|---|"]
    curves = {}
    for variant, (folder, _) in VARIANTS.items():
        for k in STEPS:
            run = folder_names[variant].format(k=k)
            curve = entropy_curve(out / folder / run)
            curves[(variant, k)] = curve
            for row in along:
                if row["run"] == f"{folder}/{run}":
                    updates = int(row["updates"])
                    recent = [e for s, e in curve if updates - 50 < s <= updates]
                    entropy = f"{sum(recent) / len(recent):.3f}" if recent else ""
                    lines.append(f"| {variant} | {k} | {updates} | {float(row['frechet']):.1f} | {entropy} |")

    # ------------------------------------------------------------------ Table 6's claims
    def fd(variant, k):
        return float(final[(variant, k)]["frechet"]), float(final[(variant, k)]["frechet_stderr"])

    def gain(variant, k):  # FD without noise minus FD with it, and its s.e.
        (a, sa), (b, sb) = fd("off", k), fd(variant, k)
        return a - b, (sa ** 2 + sb ** 2) ** 0.5

    claims = {}
    for variant in ("pyramid", "white"):
        gains = {k: gain(variant, k) for k in STEPS}
        claims[f"{variant}: noise lowers FD at k=4 and 8 (by > 2 s.e.)"] = all(g > 2 * s for g, s in gains.values())
        claims[f"{variant}: the FD gain is larger at k=4 than at k=8"] = gains[4][0] > gains[8][0]
        claims[f"{variant}: noise lowers the generator output entropy at k=4 and 8"] = all(
            float(final[(variant, k)]["gen_output_entropy"]) < float(final[("off", k)]["gen_output_entropy"]) for k in STEPS)
    lines += ["", "Table 6's claims on digits:", ""] + [f"- {'holds' if ok else 'does not hold'}: {claim}"
                                                         for claim, ok in claims.items()]
    data = {"final": {f"{v}_k{k}": r for (v, k), r in final.items()}, "teacher": teacher, "claims": claims,
            "entropy_curves": {f"{v}_k{k}": c for (v, k), c in curves.items()}, "updates": args.updates,
            "samples": args.samples}
    write_results(out, data, lines)
    write_run_info(out, run_info(command_line("noise_ablation_digits.py", args), started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
