#!/usr/bin/env bash
# Install mdlm-dmmd (editable, with test extras) into the active Python environment.
# torch is pinned first: the package index also serves newer torch builds that are multi-GB
# CUDA wheels, and every later pip call repeats the pin so nothing upgrades it.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python -m pip}"
$PIP install --quiet "torch==2.13.0"
$PIP install --quiet -e ".[dev]" "torch==2.13.0"
# The tests run torch-fidelity's Inception (pure torch). Its torchvision dependency is left out:
# the index has no CPU build of torchvision for this torch, and the tests stub the three names
# torch-fidelity imports from it (tests/metrics/test_fid.py).
$PIP install --quiet --no-deps "torch-fidelity==0.4.0"
