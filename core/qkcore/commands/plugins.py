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
@click.option("--hook", "hook_name", metavar="NAME",
              help="only the plugins implementing hook NAME (e.g. qkcore_locate_rope), in the order pluggy calls them")
@click.pass_obj
def list_command(pm: pluggy.PluginManager, as_json: bool, hook_name: str | None) -> None:
    """Name, package, version and model types of each plugin."""
    from qkcore import ENTRY_POINT_GROUP
    from qkcore.errors import QkcoreError
    from qkcore.plugins import LOAD_PLUGINS_ENV, blocked_plugins, list_plugins

    infos = list_plugins(pm)
    if hook_name is not None:
        caller = getattr(pm.hook, hook_name, None)
        if caller is None or not hook_name.startswith("qkcore_"):
            known = sorted(name for name in vars(pm.hook) if name.startswith("qkcore_"))
            raise QkcoreError(f"plugins list: --hook: no hook is called '{hook_name}' (hooks: {', '.join(known)})")
        # pluggy calls the last registered implementation first (tryfirst/trylast aside).
        order = [impl.plugin_name for impl in reversed(caller.get_hookimpls())]
        by_name = {info.name: info for info in infos}
        infos = [by_name[name] for name in order if name in by_name]
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
    if hook_name is not None:
        click.echo(f"\n{len(infos)} plugins implement {hook_name}, listed in call order; a model hook runs only "
                   "in the model's family plugin and the core's.")
        return
    blocked = blocked_plugins(pm)
    if blocked:
        click.echo(f"\nNot loaded ({LOAD_PLUGINS_ENV}): {', '.join(blocked)}")
    click.echo(f"\nPlugins register under the entry-point group '{ENTRY_POINT_GROUP}'.")
