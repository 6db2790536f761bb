"""The built-in ``qkcore`` commands, declared with click and added by :mod:`qkcore.builtin`.

* :mod:`.run`: ``sniff``, ``push`` and ``plan`` (they take a run configuration);
* :mod:`.data`: ``inspect``, ``plasticity`` and ``compare`` (they read captured datasets);
* :mod:`.plugins`: ``plugins list``;
* :mod:`.sweep`: ``sweep`` (many runs as Ray tasks).

These modules import only click at module level; each command imports what it runs
when it runs, so ``qkcore --help`` answers without importing torch.
"""

from __future__ import annotations

import click


def add_builtin_commands(cli: click.Group) -> None:
    """Add every built-in command to ``cli``."""
    from qkcore.commands import data, plugins, run, sweep

    for command in (run.sniff, run.push, run.plan, sweep.sweep, data.inspect, data.plasticity, data.compare,
                    plugins.plugins):
        cli.add_command(command)
