#!/usr/bin/env bash
# The associative memory against the authors' ARMT code (scripts/armt_reference.py says how):
# a venv with the transformers of the authors' time (4.41) for their side, the project's for ours.
#   bash scripts/armt_reference.sh PATH/modeling_amt/language_modeling.py [OUT_FOLDER]
# PATH: a clone of github.com/RodkinIvan/associative-recurrent-memory-transformer (read, not copied).
set -euo pipefail
cd "$(dirname "$0")/.."
file=${1:?give the authors\' modeling_amt/language_modeling.py}
out=${2:-/tmp/armt-reference}
ref=.venv-armt-ref
[ -x $ref/bin/python ] || python3 -m venv $ref
$ref/bin/python -c "import torch, transformers" 2>/dev/null || \
  $ref/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}" "transformers==4.41.2" "numpy<2" 2>&1 | grep -v "is ignored" || true
bash scripts/setup.sh
HF_HUB_OFFLINE=1 $ref/bin/python scripts/armt_reference.py authors --authors-file "$file" --out "$out"
HF_HUB_OFFLINE=1 .venv/bin/python scripts/armt_reference.py ours --out "$out"
