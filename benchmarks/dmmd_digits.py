"""D-MMD on 8x8 digits: teacher at 4..64 steps vs students at 4/8/16 steps, with/without noise.

Runs `mdlm-dmmd experiment=dmmd_digits` (extra Hydra overrides from the command line are passed
through), then records the command, date, machine and library versions next to the results in
`benchmarks/results/dmmd_digits_<time>/`. Target from the paper (Tables 1, 6): the 8-step
student at or below the 64-step teacher's Fréchet distance; noise input helping at 4-8 steps.

    python benchmarks/dmmd_digits.py [study.student_max_steps=1000 ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mdlm_dmmd import cli

from run_info import run_info, write_run_info  # benchmarks/ is on sys.path when run as a script


def main(overrides: list[str]) -> int:
    started = time.time()
    cfg = cli.compose(["experiment=dmmd_digits", *overrides])
    run_dir = Path(cfg.run_dir)
    code = cli.main(["experiment=dmmd_digits", f"run_dir={run_dir}", *overrides])
    command = " ".join(["python", "benchmarks/dmmd_digits.py", *overrides])
    if run_dir.is_dir():
        write_run_info(run_dir, run_info(command, started, exit_code=code))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
