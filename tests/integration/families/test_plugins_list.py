"""``qkcore plugins list`` shows each family plugin with its package, version and model types."""

from __future__ import annotations

import pytest

from qkcore.cli import main

PLUGINS = {
    "qwen3": ("qk-plugin-qwen3", "qwen3"),
    "qwen2": ("qk-plugin-qwen2", "qwen2"),
    "smollm3": ("qk-plugin-smollm3", "smollm3"),
    "glm": ("qk-plugin-glm", "glm, glm4"),
}


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_plugins_list_shows_the_family_plugin(capsys, name) -> None:
    assert main(["plugins", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    package, model_types = PLUGINS[name]
    row = next(line.split(None, 3) for line in lines if line.split()[:1] == [name])
    assert row == [name, package, "0.1.0", model_types]
