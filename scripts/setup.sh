#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: .venv with the project and its test extra.
# Without an NVIDIA GPU it takes the CPU build of torch, so nothing pulls gigabytes of CUDA
# wheels; deepspeed (sdist only) is built against that torch, not in an isolated build env
# that would download another one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.rmt-peft-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==${TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "is ignored" || true
fi
python -c "import deepspeed" 2>/dev/null || \
  DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed==0.19.8" 2>&1 | grep -v "is ignored" || true
pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
python -c "import rmt_peft, torch, deepspeed, bitsandbytes, peft, trl, datasets" 
touch "$stamp"
