"""Gemma 3 (plugin ``qk-plugin-gemma3``), the third-party route: qkcore has no line about Gemma.

The family's capture tests live with the package (``plugins/gemma3/tests``) and use
only the installed ``qkcore`` and ``qk_plugin_gemma3``; here is what concerns this
repository: the core stays free of Gemma, and the CLI lists the package.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.families._support import plugins_list_line

REPO = Path(__file__).resolve().parents[3]


def test_core_has_no_line_about_gemma() -> None:
    # The core's own source (not build metadata such as *.egg-info, which embeds the README).
    sources = [path for path in (REPO / "core" / "qkcore").rglob("*.py")]
    assert len(sources) > 20
    hits = [str(path.relative_to(REPO)) for path in sources if b"gemma" in path.read_bytes().lower()]
    assert hits == []


def test_plugins_list_shows_the_gemma3_plugin(capsys) -> None:
    line = plugins_list_line(capsys, "gemma3")
    assert "qk-plugin-gemma3" in line and "0.1.0" in line and line.rstrip().endswith("gemma3, gemma3_text")
    assert Path(__import__("qk_plugin_gemma3").__file__).parent.parent == REPO / "plugins" / "gemma3"
