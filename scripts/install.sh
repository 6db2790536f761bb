#!/usr/bin/env bash
# Create .venv (if missing) and install qkcore, every plugin under plugins/, and the test tools.
# Idempotent: rerunning only checks what is installed. Set QKCORE_TORCH_CONSTRAINT to another
# constraints file (or to an empty string) on a machine with a GPU build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
CONSTRAINT=${QKCORE_TORCH_CONSTRAINT-scripts/constraints-cpu.txt}
C=(); [ -n "$CONSTRAINT" ] && C=(-c "$CONSTRAINT")
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check "${C[@]}")
# torch first, on its own, so nothing else can pull a CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" torch
plugins=()
for p in plugins/*/; do [ -f "$p/pyproject.toml" ] && plugins+=(-e "$p"); done
"${PIP[@]}" -e ".[test]" "${plugins[@]}"
.venv/bin/python -c "import qkcore, torch; print('qkcore', qkcore.__version__, 'torch', torch.__version__)"
