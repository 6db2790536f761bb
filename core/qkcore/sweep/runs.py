"""The runs of a sweep: every config file named, or every ``*.yaml`` below a folder named, loaded once."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from qkcore.config import ConfigError, SniffConfig, load_config
from qkcore.errors import QkcoreError


@dataclass(frozen=True)
class Run:
    """One config of the sweep: its path and loaded config, or the one line saying why it did not load."""

    name: str  # the config path, as the console and the table show it
    cfg: SniffConfig | None
    error: str | None = None

    @property
    def model(self) -> str:
        """The model the run captures, for the table."""
        if self.cfg is None:
            return "?"
        config = self.cfg.model.config
        return self.cfg.model.name or (f"random-{config.get('model_type', '?')}" if isinstance(config, dict) else "?")

    @property
    def target(self) -> str:
        """Where the run publishes: the data root, and its Hub branch when it has one."""
        if self.cfg is None:
            return "-"
        out = self.cfg.output
        hub = f" -> {out.hf_repo_id}@{out.hf_branch or 'main'}" if out.hf_repo_id else ""
        return f"{out.data_root}{hub}"


def expand(paths: Sequence[str]) -> list[Path]:
    """Config files named by ``paths``: a file is itself, a folder every ``*.yaml`` below it (sorted); a missing path is kept (it fails to load, named)."""
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        found.extend(sorted(path.rglob("*.yaml")) if path.is_dir() else [path])
    unique: dict[Path, None] = dict.fromkeys(found)  # the same file named twice is one run
    return list(unique)


def load_runs(paths: Sequence[str]) -> list[Run]:
    """Every config of the sweep, loaded; a config that fails to load is a :class:`Run` with its error line."""
    runs = []
    for path in expand(paths):
        if not path.is_file():
            runs.append(Run(str(path), None, f"{path}: no such config file"))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # `qkcore plan CONFIG` shows a config's warnings
                runs.append(Run(str(path), load_config(path)))
        except (ConfigError, QkcoreError, OSError) as exc:
            runs.append(Run(str(path), None, str(exc)))
    return runs
