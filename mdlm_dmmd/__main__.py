"""`python -m mdlm_dmmd ...` is the same as the `mdlm-dmmd` console script."""

from mdlm_dmmd.cli import entry

entry()
