#!/usr/bin/env bash
# Install, check the import layering (pyproject.toml [tool.importlinter]), then run the default
# (fast, CPU-only, offline) test suite. Extra args go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
lint-imports --no-cache
python -m pytest -q "$@"
