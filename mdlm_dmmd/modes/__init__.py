"""The host's modes, each a small recipe over the shared parts (`training`, `eval/`) in a file of
its own; `mode=NAME` runs `MODES[NAME](cfg)` on the composed config. Only the CLI imports this
package.

Everything a run writes goes under `run_dir`; inputs are checked and models built before that
folder is created, so a wrong input leaves nothing half-written.
"""

from mdlm_dmmd.modes import evaluate, sample, study, sweep, train

MODES = {
    "train": train.run,
    "sample": sample.run,
    "eval": evaluate.run,
    "study": study.run,
    "sweep": sweep.run,
}
