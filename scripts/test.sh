#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# tiny models: one thread per process is faster than two fighting over 2 cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the lint rules and the layering of pyproject.toml ([tool.ruff], [tool.importlinter]): seconds
.venv/bin/ruff check .
.venv/bin/lint-imports
exec .venv/bin/python -m pytest tests "$@"
