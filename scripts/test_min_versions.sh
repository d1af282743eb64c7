#!/usr/bin/env bash
# The test suite against the LOWEST versions pyproject.toml allows: every "name>=X" dependency is
# pinned to "name==X" in a separate .venv-min/ (the project's own .venv/ is left alone). It
# downloads torch and the rest (several GB with CUDA wheels) and then runs the whole suite (about
# 6 minutes on 2 cores): too slow and too network-bound for every CI run, so run it by hand before a
# release or after changing a lower bound. Extra arguments go to pytest (e.g. tests/train -x).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
constraints=.venv-min/constraints.txt
[ -x .venv-min/bin/python ] || "$PY" -m venv .venv-min
.venv-min/bin/python - "$constraints" <<'PYEOF'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
pins = [re.sub(r"\s*>=\s*", "==", d.split(",")[0]) for d in deps if ">=" in d]
open(sys.argv[1], "w").write("\n".join(pins) + "\n")
print("lowest supported set:", " ".join(pins))
PYEOF
pin() { grep -i "^$1==" "$constraints"; }
.venv-min/bin/pip install -q --upgrade pip setuptools wheel
.venv-min/bin/pip install -q "$(pin torch)"
DS_BUILD_OPS=0 .venv-min/bin/pip install -q --no-build-isolation -c "$constraints" "$(pin deepspeed)"
.venv-min/bin/pip install -q -c "$constraints" -e ".[test]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv-min/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|trl|accelerate|deepspeed|bitsandbytes|datasets|huggingface.hub|safetensors) "
exec .venv-min/bin/python -m pytest tests "$@"
