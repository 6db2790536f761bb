"""What this repository's family tests need beyond the plugin test kit (:mod:`qkcore.testing`)."""

from __future__ import annotations

import pytest


def plugins_list_line(capsys: pytest.CaptureFixture[str], name: str) -> str:
    """The ``qkcore plugins list`` line of plugin ``name`` (run in-process)."""
    from qkcore.cli import main

    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    return next(line for line in out.splitlines() if line.split()[:1] == [name])
