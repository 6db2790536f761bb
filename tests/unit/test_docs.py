"""The plugin author's guide (docs/plugins.md) says what the code does: every hook with its exact
signature, and a complete plugin that installs, loads and passes its own tests as written."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import tomllib
from pathlib import Path

import pytest

from qkcore import hookspecs
from qkcore.plugins import make_plugin_manager, resolve_family
from qkcore.testing import eager_reference, sniff
from tests.conftest import REPO

GUIDE = REPO / "docs" / "plugins.md"


def _signature(hook) -> str:
    """``name(arg: type, ...) -> type`` as hookspecs.py writes it."""
    signature = inspect.signature(hook)
    arguments = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
    return f"{hook.__name__}({arguments}) -> {signature.return_annotation}"


def _hookspecs() -> dict[str, str]:
    return {name: _signature(hook) for name, hook in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(hook, "qkcore_spec")}


def test_every_hook_is_documented_with_its_exact_signature() -> None:
    documented = re.findall(r"^#### `(qkcore_\w+\(.*\) -> .*)`$", GUIDE.read_text(encoding="utf-8"), re.M)
    assert len(documented) == len(set(documented))
    assert sorted(documented) == sorted(_hookspecs().values())


def test_the_readme_and_the_worked_example_point_to_the_guide() -> None:
    assert "docs/plugins.md" in (REPO / "README.md").read_text(encoding="utf-8")
    assert "docs/plugins.md" in (REPO / "plugins" / "gemma3" / "README.md").read_text(encoding="utf-8")


def _block(text: str, caption: str) -> str:
    """The code block right after the paragraph that starts with ``caption`` in backticks."""
    match = re.search(rf"^`{re.escape(caption)}`.*?:\n\n```\w+\n(.*?)^```", text, re.S | re.M)
    assert match, f"no code block for {caption} in {GUIDE}"
    return match.group(1)


@pytest.fixture
def olmo2_plugin(tmp_path, monkeypatch):
    """The guide's plugin, installed as its pyproject.toml says (a distribution with that entry point)."""
    text = GUIDE.read_text(encoding="utf-8")
    project = tomllib.loads(_block(text, "pyproject.toml"))["project"]
    (name, module), = project["entry-points"]["qkcore.plugins"].items()
    site = tmp_path / "site"
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(f"[qkcore.plugins]\n{name} = {module}\n", encoding="utf-8")
    (site / f"{module}.py").write_text(_block(text, f"{module}.py"), encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield name, _block(text, "tests/test_qk_plugin_olmo2.py")
    sys.modules.pop(module, None)


def test_the_guides_plugin_loads_and_passes_its_own_tests(olmo2_plugin, tmp_path) -> None:
    name, tests_source = olmo2_plugin
    family = resolve_family(make_plugin_manager(), "olmo2")
    assert (family.plugin_name, family.plugin_version, family.is_fallback) == (name, "0.1.0", False)
    tests: dict = {}
    exec(compile(tests_source, "tests/test_qk_plugin_olmo2.py", "exec"), tests)
    assert tests["pytest_plugins"] == ["qkcore.testing"]
    tests["test_the_plugin_handles_olmo2"]()
    tests["test_rows_reproduce_eager_attention"](
        lambda architecture: eager_reference(tmp_path, architecture),
        lambda architecture, **sections: sniff(tmp_path, architecture, **sections),
    )
    notes = (sniff(tmp_path, tests["ARCH"], capture={"capture_pre_rope": True, "layers": [0], "heads": [0]})
             .data_root / "README.md").read_text(encoding="utf-8")
    assert "OLMo 2: Q/K rows are the q_norm/k_norm outputs before rotary embedding." in notes
