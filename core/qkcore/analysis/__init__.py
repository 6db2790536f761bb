"""Analyses that run on a captured Q/K dataset.

An analysis is any object satisfying :class:`Analysis`. Plugins expose analyses
through the ``qkcore_analyses`` hook; the core CLI adds one subcommand per name
(``qkcore <name> ...``), lets the analysis declare its arguments, and calls
:meth:`Analysis.run` with the parsed namespace.
"""

from __future__ import annotations

import argparse
from typing import Protocol, runtime_checkable

__all__ = ["Analysis"]


@runtime_checkable
class Analysis(Protocol):
    """A ``qkcore`` subcommand that reads a captured dataset and writes results."""

    #: Subcommand name (``qkcore <name>``).
    name: str
    #: One-line help shown in ``qkcore --help``.
    help: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare the subcommand's arguments on ``parser``."""
        ...

    def run(self, args: argparse.Namespace) -> int:
        """Run the analysis; return a process exit code (0 on success)."""
        ...
