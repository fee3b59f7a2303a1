"""A third opinion on a digits study: re-draw its rows (same checkpoints, seed and batch size, so
the same samples: checked against the study's own fd_digits_mlp) and score them in feature
spaces the package does not ship: the `digits_mlp` architecture trained with other seeds
(the issue's "another MLP, other seed"), against the train split and against all 1797 digits,
and on the first 1000 samples as well as all of them.

    python benchmarks/third_feature_space.py STUDY_DIR [--seeds 1 2] [--rows teacher:16 teacher:32 ...]
Writes STUDY_DIR/third_feature_space.{csv,md} and run_info (third_feature_space_run_info.json).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from mdlm_dmmd.metrics import digits_classifier as dc
from mdlm_dmmd.metrics import digits_mlp
from mdlm_dmmd.metrics.features import feature_statistics
from mdlm_dmmd.metrics.frechet import frechet_distance
from mdlm_dmmd.pipeline import Pipeline

from run_info import run_info  # benchmarks/ is on sys.path when run as a script


def draw(checkpoint: Path, steps: int, num: int, seed: int, batch: int) -> torch.Tensor:
    pipeline = Pipeline.from_checkpoint(checkpoint)
    return pipeline.generate(num, steps=steps, generator=torch.Generator().manual_seed(seed), batch_size=batch)


def fd(extractor, samples: torch.Tensor, split: str, boot: int = 10) -> tuple[float, float]:
    """FD against every image of `split`, ± the s.d. over `boot` with-replacement resamples."""
    mu, sigma = extractor.reference_statistics(split, {"name": "digits"})
    feats = extractor.features(samples).double().numpy()
    value = frechet_distance(*feature_statistics(feats), mu, sigma)
    rng = np.random.default_rng(0)
    resampled = [frechet_distance(*feature_statistics(feats[rng.integers(0, len(feats), len(feats))]), mu, sigma)
                 for _ in range(boot)]
    return value, float(np.std(resampled, ddof=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rows", nargs="+", default=["teacher:8", "teacher:16", "teacher:32", "teacher:64", "dmmd_k8_noise:8"])
    args = parser.parse_args()
    started = time.time()
    config = OmegaConf.to_container(OmegaConf.load(args.study / "config.yaml"))
    num, seed, batch = int(config["study"]["num_samples"]), int(config["sampling"]["seed"]), int(config["sampling"]["batch_size"])
    with open(args.study / "results.csv", newline="") as f:
        study_rows = list(csv.DictReader(f))
    primary = dc.DigitsClassifierFeatures(digits_mlp.RECIPE)
    others = {s: dc.DigitsClassifierFeatures(dataclasses.replace(digits_mlp.RECIPE, name=f"digits_mlp_seed{s}", seed=s))
              for s in args.seeds}
    out = []
    for spec in args.rows:
        run, steps = spec.split(":")
        checkpoint = args.study / run / "checkpoints" / "final.ckpt"
        samples = draw(checkpoint, int(steps), num, seed, batch)
        method = "teacher" if run == "teacher" else next(r["method"] for r in study_rows if r["method"] != "teacher")
        recorded = next(float(r["fd_digits_mlp"]) for r in study_rows if r["method"] == method and r["steps"] == steps)
        same, _ = fd(primary, samples, "train", boot=2)
        row = {"method": method, "steps": int(steps), "same_samples_as_study": abs(same - recorded) < 1e-6 * recorded}
        for s, extractor in others.items():
            for split in ("train", "all"):
                for n in (1000, num):
                    value, error = fd(extractor, samples[:n], split)
                    row[f"fd_mlp_seed{s}_{split}_n{n}"] = value
                    row[f"fd_mlp_seed{s}_{split}_n{n}_stderr"] = error
        print(row, flush=True)
        out.append(row)
    columns = list(out[0])
    with open(args.study / "third_feature_space.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(out)
    accuracy = {s: e.details()["classifier_accuracy"] for s, e in others.items()}
    lines = [f"# Other MLP seeds on {args.study.name}", "",
             f"`digits_mlp`'s architecture and recipe with seeds {args.seeds} (held-out accuracy "
             + ", ".join(f"seed {s}: {a:.3f}" for s, a in accuracy.items())
             + "); FD ± bootstrap s.d. (10 resamples); n = samples scored; train = the 1617 training digits, "
             "all = all 1797.", "",
             "| " + " | ".join(c for c in columns if not c.endswith("_stderr")) + " |",
             "|" + "---|" * len([c for c in columns if not c.endswith("_stderr")])]
    for row in out:
        cells = []
        for c in columns:
            if c.endswith("_stderr"):
                continue
            v = row[c]
            cells.append(f"{v:.1f} ± {row[c + '_stderr']:.1f}" if f"{c}_stderr" in row else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    (args.study / "third_feature_space.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    info = run_info(f"python benchmarks/third_feature_space.py {args.study} --seeds {' '.join(map(str, args.seeds))} "
                    f"--rows {' '.join(args.rows)}", started)
    (args.study / "third_feature_space_run_info.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
