"""D-MMD on 8x8 digits: teacher at 4..64 steps vs students at 4/8/16 steps, with/without noise.

Runs `mdlm-dmmd experiment=dmmd_digits` (extra Hydra overrides from the command line are passed
through), then records the command, date, machine and library versions next to the results in
`benchmarks/results/dmmd_digits_<time>/`. Target from the paper (Tables 1, 6): the 8-step
student at or below the 64-step teacher's Fréchet distance; noise input helping at 4-8 steps.

    python benchmarks/dmmd_digits.py [study.student_max_steps=1000 ...]
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

from mdlm_dmmd import cli


def main(overrides: list[str]) -> int:
    started = time.time()
    cfg = cli.compose(["experiment=dmmd_digits", *overrides])
    run_dir = Path(cfg.run_dir)
    code = cli.main(["experiment=dmmd_digits", f"run_dir={run_dir}", *overrides])
    info = {
        "command": " ".join(["python", "benchmarks/dmmd_digits.py", *overrides]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".strip(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "lightning", "mdlm-dmmd")},
        "wall_minutes": round((time.time() - started) / 60, 1),
        "exit_code": code,
    }
    if run_dir.is_dir():
        (run_dir / "run_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
