"""``qkcore plugins list``: the loaded plugins, as a table or (``--json``) with the hooks each implements."""

from __future__ import annotations

import dataclasses
import json

import click
import pluggy


@click.group()
def plugins() -> None:
    """Installed plugins (model families, samplers, commands)."""


@plugins.command("list")
@click.option("--json", "as_json", is_flag=True,
              help="a JSON list: name, package, version, model types, built-in or not, and the hooks each implements")
@click.pass_obj
def list_command(pm: pluggy.PluginManager, as_json: bool) -> None:
    """Name, package, version and model types of each plugin."""
    from qkcore import ENTRY_POINT_GROUP
    from qkcore.plugins import LOAD_PLUGINS_ENV, blocked_plugins, list_plugins

    infos = list_plugins(pm)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(info) for info in infos], indent=2))
        return
    rows = [("NAME", "PACKAGE", "VERSION", "MODEL TYPES")]
    for info in infos:
        types = ", ".join(info.model_types) if info.model_types else ("(built-in)" if info.builtin else "-")
        rows.append((info.name, info.package, info.version, types))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    blocked = blocked_plugins(pm)
    if blocked:
        click.echo(f"\nNot loaded ({LOAD_PLUGINS_ENV}): {', '.join(blocked)}")
    click.echo(f"\nPlugins register under the entry-point group '{ENTRY_POINT_GROUP}'.")
