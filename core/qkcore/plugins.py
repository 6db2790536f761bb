"""Loading plugins and resolving which one handles a model.

Plugins register under the entry-point group :data:`qkcore.ENTRY_POINT_GROUP`
(``qkcore.plugins``). The core's own modules (generic defaults, built-in
samplers and analyses) are registered the same way, as internal plugins.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import pluggy
import structlog

from qkcore import ENTRY_POINT_GROUP, hookspecs
from qkcore.errors import QkcoreError

log = structlog.get_logger(__name__)

#: Core modules that implement hooks; listed as the ``qkcore`` plugin.
BUILTIN_MODULES = ("qkcore.generic", "qkcore.samplers", "qkcore.analysis.plasticity")
GENERIC_PLUGIN = "qkcore.generic"


@dataclass(frozen=True)
class PluginInfo:
    """One installed plugin, as ``qkcore plugins list`` shows it."""

    name: str
    package: str
    version: str
    model_types: tuple[str, ...]
    builtin: bool = False


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """Return a plugin manager with the core's hooks and every installed plugin."""
    pm = pluggy.PluginManager("qkcore")
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside the module
                raise
            continue
        pm.register(module, name=name)
    if load_entry_points:
        _load_entry_points(pm)
    return pm


#: Package name and version of each entry-point plugin, by plugin object id.
_DISTS: dict[int, tuple[str, str]] = {}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register every ``qkcore.plugins`` entry point, naming the one that fails to import.

    A broken plugin is an error, not a skip: skipping it could silently hand
    its models to the generic fallback.
    """
    from importlib.metadata import distributions

    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                package = dist.metadata["name"]
                raise QkcoreError(
                    f"plugin '{ep.name}' from package {package} {dist.version} failed to load ({ep.value}): "
                    f"{type(exc).__name__}: {exc}; reinstall it or `pip uninstall {package}`"
                ) from exc
            pm.register(plugin, name=ep.name)
            _DISTS[id(plugin)] = (dist.metadata["name"], dist.version)


def list_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Describe every registered plugin: entry-point plugins first, then the core's."""
    from qkcore import __version__

    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        types = tuple(_model_types_of(pm, plugin))
        dist = _DISTS.get(id(plugin))
        if dist is not None:
            infos.append(PluginInfo(name, dist[0], dist[1], types))
        else:
            infos.append(PluginInfo(name, "qkcore", __version__, types, builtin=True))
    return sorted(infos, key=lambda p: (p.builtin, p.name))


def _model_types_of(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    impl = getattr(plugin, "qkcore_model_types", None)
    return list(impl()) if impl is not None else []


@dataclass
class Family:
    """The hooks of the one plugin that handles a model (plus the generic defaults).

    Each attribute is a pluggy hook caller restricted to that plugin and the
    core's built-ins, so two plugins never answer for the same model.
    """

    model_type: str
    plugin_name: str
    plugin_version: str
    is_fallback: bool
    hooks: Any = field(repr=False)


def resolve_family(pm: pluggy.PluginManager, model_type: str) -> Family:
    """Pick the plugin whose ``qkcore_model_types`` lists ``model_type``.

    With none, the generic fallback is used (and logged); with two, it is an
    error naming both so the user can uninstall one.
    """
    owners = [
        (name, plugin)
        for name, plugin in pm.list_name_plugin()
        if plugin is not None and model_type in _model_types_of(pm, plugin)
    ]
    if len(owners) > 1:
        names = ", ".join(name for name, _ in owners)
        raise QkcoreError(f"model_type '{model_type}' is claimed by several plugins: {names}; uninstall all but one")
    family_plugins = {
        id(plugin) for name, plugin in pm.list_name_plugin() if plugin is not None and _model_types_of(pm, plugin)
    }
    keep = {id(plugin) for _, plugin in owners}
    others = [p for _, p in pm.list_name_plugin() if p is not None and id(p) in family_plugins - keep]

    class _Hooks:
        def __getattr__(self, hook_name: str) -> Any:
            return pm.subset_hook_caller(hook_name, remove_plugins=others)

    if owners:
        name, plugin = owners[0]
        version = _DISTS.get(id(plugin), ("", "builtin"))[1]
        return Family(model_type, name, version, False, _Hooks())
    log.warning("no plugin handles this model_type; using the generic fallback", model_type=model_type)
    return Family(model_type, GENERIC_PLUGIN, "builtin", True, _Hooks())


def installed_summary(pm: pluggy.PluginManager) -> str:
    """One line naming the installed family plugins and their model types (for error messages)."""
    parts = [f"{p.name} ({', '.join(p.model_types)})" for p in list_plugins(pm) if p.model_types]
    return "; ".join(parts) if parts else "none"
