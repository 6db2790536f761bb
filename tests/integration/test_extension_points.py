"""Third-party extension points work through the plugin manager alone."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from qkcore import hookimpl
from qkcore.config import load_config
from qkcore.plugins import make_plugin_manager
from qkcore.samplers import Sampler
from qkcore.sniff import run_sniff
from tests.conftest import REPO


class EveryThirdSampler(Sampler):
    """Keeps positions 0, 3, 6, ... (p_keep 1 or 0); bucket = position // min_bucket_size."""

    name = "every_third"

    def buckets(self, positions: torch.Tensor) -> torch.Tensor:
        return positions // self.min_bucket_size

    def keep_probability(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions % 3 == 0).to(torch.float64)

    def p_keep_rule(self) -> str:
        return "p_keep = 1 if position % 3 == 0 else 0"


def test_a_sampler_from_another_plugin_drives_a_sniff(tiny_config) -> None:
    plugin = types.ModuleType("qk_plugin_every_third")

    @hookimpl
    def qkcore_samplers():
        return {"every_third": EveryThirdSampler}

    plugin.qkcore_samplers = qkcore_samplers
    pm = make_plugin_manager()
    pm.register(plugin, name="every_third")
    cfg = load_config(tiny_config(capture={"sampler": {"type": "every_third"}, "layers": [1]}))
    result = run_sniff(cfg, pm)
    table = pq.read_table(result.data_root / "l01h00q" / "data.parquet").to_pydict()
    assert table["position"] and all(p % 3 == 0 for p in table["position"])
    assert table["bucket"] == [p // cfg.capture.min_bucket_size for p in table["position"]]


def _plugin_test_files() -> list[Path]:
    return sorted(REPO.glob("plugins/*/tests/**/*.py"))


def test_plugin_tests_import_only_the_installed_packages() -> None:
    # A plugin's own tests must run wherever qkcore and the plugin are installed: nothing from this
    # repository's `tests` package, no other plugin. Without an __init__.py their folder is no package
    # (a `tests` package there would shadow this repository's under pytest's default import mode), so
    # pytest imports each file by its bare name: names must be unique across the plugins.
    files = _plugin_test_files()
    assert any(path.name.startswith("test_") for path in files)
    assert [str(p.relative_to(REPO)) for p in files if p.name == "__init__.py"] == []
    names = [path.name for path in files if path.name != "conftest.py"]
    assert len(names) == len(set(names)), names
    for path in files:
        own = f"qk_plugin_{path.relative_to(REPO / 'plugins').parts[0]}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [(node.module or "").split(".")[0]] if node.level == 0 else ["<relative>"]
            else:
                continue
            for root in roots:
                assert root not in ("tests", "<relative>", "conftest"), f"{path.relative_to(REPO)}:{node.lineno}"
                assert not root.startswith("qk_plugin_") or root == own, f"{path.relative_to(REPO)}:{node.lineno}"


@pytest.mark.slow
def test_pytest_collects_the_plugin_tests_from_the_repository_root() -> None:
    # testpaths = ["tests", "plugins"]: a bare `pytest` at the root collects both without a name clash.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = done.stdout.splitlines()
    for path in _plugin_test_files():
        if path.name.startswith("test_"):
            assert any(line.startswith(f"{path.relative_to(REPO)}::") for line in collected), path
    assert "tests/integration/families/test_gemma3.py::test_core_has_no_line_about_gemma" in collected
