"""The core's own plugin: the built-in commands and samplers, added like any plugin's.

Registered by :func:`qkcore.plugins.make_plugin_manager` before the installed
plugins (the generic model hooks are the other core plugin, ``qkcore.generic``).
Importing it costs nothing heavy: the commands import what they run when they run,
and the samplers' module (torch) is imported when samplers are asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkcore import hookimpl

if TYPE_CHECKING:  # pragma: no cover - typing only
    import click

    from qkcore.samplers import SamplerFactory


@hookimpl(tryfirst=True)
def qkcore_register_commands(cli: click.Group) -> None:
    """Add ``sniff``, ``push``, ``plan``, ``inspect``, ``plasticity``, ``compare`` and ``plugins`` (first, so a clash names the plugin)."""
    from qkcore.commands import add_builtin_commands

    add_builtin_commands(cli)


@hookimpl
def qkcore_samplers() -> dict[str, SamplerFactory]:
    """Register the built-in samplers."""
    from qkcore.samplers import AllSampler, LogUniformSampler, UniformSampler

    return {"uniform": UniformSampler, "log_uniform": LogUniformSampler, "all": AllSampler}
