"""The parts of `mode=sweep` (recipe: `mdlm_dmmd/modes/sweep.py`, which documents the protocol):
`config` checks `sweep.*`, `judges` keeps a reference model from judging itself, `literature`
reads quoted rows, `plan` loads the checkpoints and lays out the jobs, `resume` finds the rows a
previous run already measured, `output` writes the tables and pictures."""
