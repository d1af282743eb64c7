#!/usr/bin/env bash
# Set up (if needed) and run the quickstart: a tiny GPT-Neo built from a config learns, on CPU and
# offline, to recall a token from the first segment through its memory; prints accuracy by number
# of segments for the memory model and the no-memory baseline. Extra arguments are recipe overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# tiny models: one thread per process is faster than two fighting over 2 cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/rmt-peft train quickstart "training.output_dir=runs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
