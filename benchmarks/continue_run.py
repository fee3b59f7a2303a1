"""Train a finished run further: reload its saved config, resume from its last checkpoint.

A study trains its D-MMD students with a config it composes itself, so there is no command line
to repeat with `checkpoint=...last.ckpt`. This reads RUN_DIR/config.yaml, applies dotted
overrides (e.g. a larger `trainer.max_steps`), and resumes in RUN_DIR from
`checkpoints/last.ckpt`: the same weights, EMA, optimiser state and data order as an
uninterrupted run (the rates are constant after warm-up, so nothing else changes). The
checkpoints keep their `stepN.ckpt` names, for `checkpoint_trajectory.py`.

    python benchmarks/continue_run.py RUN_DIR trainer.max_steps=3200
Writes RUN_DIR/continue_<max_steps>_run_info.json (command, date, machine, wall time).

A student whose teacher has moved (or whose older config names it by a relative path) takes
`algo.teacher=NEW_PATH`; the copy must hold the same bytes (the checkpoint records its sha256).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from mdlm_dmmd import cli

from run_info import run_info, write_run_info  # benchmarks/ is on sys.path when run as a script


def main(argv: list[str]) -> int:
    if not argv or not Path(argv[0], "config.yaml").is_file():
        raise SystemExit(__doc__)
    started = time.time()
    run_dir, overrides = Path(argv[0]), argv[1:]
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise SystemExit(f"{last} does not exist: nothing to continue from")
    cfg = OmegaConf.merge(OmegaConf.load(run_dir / "config.yaml"), OmegaConf.from_dotlist(overrides))
    cfg.mode, cfg.run_dir, cfg.checkpoint = "train", str(run_dir), str(last)
    teacher = (cfg.get("algo") or {}).get("teacher")
    if teacher is not None and not Path(teacher).expanduser().exists():
        raise SystemExit(f"teacher '{teacher}' (algo.teacher in {run_dir / 'config.yaml'}) does not exist from "
                         f"{Path.cwd()}; pass algo.teacher=PATH (a moved copy with the same bytes is accepted)")
    cli.dispatch(cfg)
    command = " ".join(["python", "benchmarks/continue_run.py", *argv])
    write_run_info(run_dir / f"continue_{cfg.trainer.max_steps}", run_info(command, started))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
