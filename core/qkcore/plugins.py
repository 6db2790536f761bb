"""Loading plugins and resolving which one handles a model.

Plugins register under the entry-point group :data:`qkcore.ENTRY_POINT_GROUP`
(``qkcore.plugins``); pluggy loads them (``load_setuptools_entrypoints``) and
remembers each one's distribution (``list_plugin_distinfo``). The core's own hook
modules, :data:`BUILTIN_MODULES`, are registered first, as internal plugins.

Two environment switches:

* ``QKCORE_LOAD_PLUGINS`` (:data:`LOAD_PLUGINS_ENV`): a comma-separated list of plugin
  names (the NAME column of ``qkcore plugins list``) loads only those;
  ``QKCORE_LOAD_PLUGINS=`` (empty) loads none but the core's own. Unset: every
  installed plugin. A name no installed plugin has is an error.
* ``QKCORE_TRACE_PLUGINS=1`` (:data:`TRACE_PLUGINS_ENV`): every hook call is printed
  to stderr (``qkcore: trace:`` lines: the hook, its arguments, the plugins it runs
  in call order, then its result and time), through pluggy's hook-call monitoring.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pluggy
import structlog

from qkcore import ENTRY_POINT_GROUP, hookspecs
from qkcore.errors import QkcoreError

log = structlog.get_logger(__name__)

#: Core modules that implement hooks, registered under their module names (package ``qkcore``).
BUILTIN_MODULES = ("qkcore.generic", "qkcore.builtin")
GENERIC_PLUGIN = "qkcore.generic"
#: Comma-separated plugin names to load; empty loads none but the core's own; unset loads all.
LOAD_PLUGINS_ENV = "QKCORE_LOAD_PLUGINS"
#: ``1`` prints every hook call to stderr.
TRACE_PLUGINS_ENV = "QKCORE_TRACE_PLUGINS"

_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "": False, "0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, as ``qkcore plugins list`` shows it."""

    name: str
    package: str
    version: str
    model_types: tuple[str, ...]
    builtin: bool = False
    hooks: tuple[str, ...] = ()  # the hooks it implements, sorted


def make_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """Return a plugin manager with the core's hooks and the installed plugins.

    ``load_entry_points=False`` registers the core's own modules only. The
    environment switches in the module docstring restrict loading and turn on tracing.
    """
    trace = _switch(TRACE_PLUGINS_ENV)
    pm = pluggy.PluginManager("qkcore")
    pm.add_hookspecs(hookspecs)
    if trace:  # before anything registers, so the commands' and samplers' registration shows too
        trace_hook_calls(pm)
    for name in BUILTIN_MODULES:
        pm.register(importlib.import_module(name), name=name)
    if load_entry_points:
        _load_entry_points(pm, os.environ.get(LOAD_PLUGINS_ENV))
    return pm


def _switch(name: str) -> bool:
    value = os.environ.get(name, "")
    try:
        return _SWITCH[value.strip().lower()]
    except KeyError:
        raise QkcoreError(f"{name}={value!r}: expected 1 or 0") from None


def _load_entry_points(pm: pluggy.PluginManager, only: str | None) -> None:
    """Register the ``qkcore.plugins`` entry points (those ``only`` names, if given).

    A plugin that fails to import or to register is an error naming it, its package
    and version, not a skip: skipping it could silently hand its models to the
    generic fallback. So is a hook implementation no hookspec declares (a typo would
    otherwise never be called).
    """
    installed = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    if only is not None:
        wanted = {name.strip() for name in only.split(",") if name.strip()}
        unknown = sorted(wanted - set(installed.names))
        if unknown:
            raise QkcoreError(
                f"{LOAD_PLUGINS_ENV}: no installed plugin is called {', '.join(map(repr, unknown))} "
                f"(installed: {', '.join(sorted(installed.names)) or 'none'})"
            )
        for name in set(installed.names) - wanted:
            pm.set_blocked(name)
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    except Exception as exc:
        # pluggy goes through the distributions in the order entry_points() lists them and
        # stops at the failure: the first entry point neither registered nor blocked.
        failed = next(
            (ep for ep in installed if not pm.has_plugin(ep.name) and not pm.is_blocked(ep.name)), None
        )
        if failed is None:  # pragma: no cover - pluggy failed outside any entry point
            raise
        package, version = _distribution(failed)
        raise QkcoreError(
            f"plugin '{failed.name}' from package {package} {version} failed to load ({failed.value}): "
            f"{type(exc).__name__}: {exc}; reinstall it or `pip uninstall {package}`"
        ) from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        dist = next((d for p, d in pm.list_plugin_distinfo() if p is exc.plugin), None)
        origin = f" from package {dist.project_name} {dist.version}" if dist is not None else ""
        raise QkcoreError(f"plugin '{name}'{origin}: {exc}; qkcore's hooks are listed in qkcore/hookspecs.py") from exc


def _distribution(ep: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    return (dist.metadata["name"], dist.version) if dist is not None else ("?", "?")


def trace_hook_calls(pm: pluggy.PluginManager) -> None:
    """Print every hook call of ``pm`` to stderr: two ``qkcore: trace:`` lines per call."""
    started: list[float] = []

    def before(hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        arguments = ", ".join(f"{key}={_brief(value)}" for key, value in kwargs.items())
        order = ", ".join(impl.plugin_name for impl in reversed(impls)) or "no plugin"  # pluggy calls LIFO
        _trace(f"{hook_name}({arguments}) -> {order}")
        started.append(time.perf_counter())

    def after(outcome: pluggy.Result, hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        elapsed = (time.perf_counter() - started.pop()) * 1000
        result = f"raised {_brief(outcome.exception)}" if outcome.exception else f"= {_brief(outcome.get_result())}"
        _trace(f"{hook_name} {result} ({elapsed:.1f} ms)")

    pm.add_hookcall_monitoring(before, after)


def _trace(line: str) -> None:
    print(f"qkcore: trace: {line}", file=sys.stderr)


def _brief(value: Any, depth: int = 0) -> str:
    """A short, cheap description: never the repr of a model or a tensor's values."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(_clip(value))
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {_clip(str(value))}"
    if isinstance(value, type) or inspect.isroutine(value):
        return getattr(value, "__qualname__", type(value).__name__)
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        if depth >= 2:
            return f"<{type(value).__name__} of {len(value)}>"
        if isinstance(value, dict):
            parts = [f"{_brief(k, depth + 1)}: {_brief(v, depth + 1)}" for k, v in list(value.items())[:4]]
        else:
            parts = [_brief(item, depth + 1) for item in list(value)[:4]]
        if len(value) > 4:
            parts.append(f"... ({len(value)})")
        left, right = "[]" if isinstance(value, list) else "()" if isinstance(value, tuple) else "{}"
        return left + ", ".join(parts) + right
    shape = getattr(value, "shape", None)
    return f"<{type(value).__name__} {tuple(shape)}>" if shape is not None else f"<{type(value).__name__}>"


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def list_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Describe every registered plugin: entry-point plugins first, then the core's."""
    from qkcore import __version__

    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    declared = dict(_results_by_plugin(pm, "qkcore_model_types"))
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked (QKCORE_LOAD_PLUGINS)
            continue
        types = tuple(declared.get(name) or ())
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        dist = dists.get(id(plugin))
        if dist is not None:
            infos.append(PluginInfo(name, dist.project_name, dist.version, types, hooks=hooks))
        else:
            infos.append(PluginInfo(name, "qkcore", __version__, types, builtin=True, hooks=hooks))
    return sorted(infos, key=lambda p: (p.builtin, p.name))


def blocked_plugins(pm: pluggy.PluginManager) -> list[str]:
    """Names of the installed plugins ``QKCORE_LOAD_PLUGINS`` left out."""
    return sorted(name for name, plugin in pm.list_name_plugin() if plugin is None and pm.is_blocked(name))


def _results_by_plugin(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call hook ``hook_name`` on each plugin implementing it, alone; ``(plugin name, result)`` in call order.

    Each call goes through pluggy (a subset hook caller), so ``QKCORE_TRACE_PLUGINS``
    shows it, and each result is known by the plugin that gave it (for clash errors).
    """
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    results = []
    for impl in reversed(impls):  # pluggy's own call order: last registered first
        others = [other.plugin for other in impls if other is not impl]
        answers = pm.subset_hook_caller(hook_name, remove_plugins=others)(**kwargs)
        results.append((impl.plugin_name, answers[0] if answers else None))
    return results


def clash_error(what: str, name: str, first: str, second: str) -> QkcoreError:
    """The one error for a name two plugins both provide (a command, a sampler, a model type).

    qkcore never picks one silently: which one won would depend on install order.
    """
    return QkcoreError(
        f"the {what} '{name}' is provided twice ({first} and {second}); uninstall one of the plugins, "
        f"or leave it out with {LOAD_PLUGINS_ENV}"
    )


def collect_named(pm: pluggy.PluginManager, hook_name: str, what: str) -> dict[str, tuple[str, Any]]:
    """Merge the name -> value mappings (or name lists) a collected hook returns: ``{name: (plugin, value)}``.

    A name two plugins provide is :func:`clash_error`, as for commands.
    """
    merged: dict[str, tuple[str, Any]] = {}
    for plugin_name, provided in _results_by_plugin(pm, hook_name):
        items = provided.items() if isinstance(provided, Mapping) else ((name, None) for name in provided or ())
        for name, value in items:
            if name in merged and merged[name][0] != plugin_name:
                raise clash_error(what, name, merged[name][0], plugin_name)
            merged[name] = (plugin_name, value)
    return merged


def model_type_owners(pm: pluggy.PluginManager) -> dict[str, str]:
    """``{model_type: plugin name}`` over every loaded plugin's ``qkcore_model_types``.

    A model type two plugins claim is an error naming both (:func:`clash_error`).
    """
    return {model_type: plugin for model_type, (plugin, _) in collect_named(pm, "qkcore_model_types", "model type").items()}


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

    def key_head(self, query_head: int, num_query_heads: int, num_key_value_heads: int) -> int:
        """The key/value head ``query_head`` attends with, by the family's ``qkcore_key_head`` (GQA).

        A :data:`qkcore.heads.KeyHeadMapper`: the one way the core and the test kit ask a family.
        """
        return self.hooks.qkcore_key_head(
            query_head=query_head, num_query_heads=num_query_heads, num_key_value_heads=num_key_value_heads
        )


def resolve_family(pm: pluggy.PluginManager, model_type: str) -> Family:
    """Pick the plugin whose ``qkcore_model_types`` lists ``model_type``.

    Its model hooks, and the core's generic ones, answer for the model; no other
    plugin's do, not even one that declares no model types. With no owner the
    generic fallback is used (and logged); a model type two plugins claim is an
    error naming both so the user can uninstall one.
    """
    owner = model_type_owners(pm).get(model_type)
    keep = {owner, *BUILTIN_MODULES}
    others = [plugin for name, plugin in pm.list_name_plugin() if plugin is not None and name not in keep]

    class _Hooks:
        def __getattr__(self, hook_name: str) -> Any:
            return pm.subset_hook_caller(hook_name, remove_plugins=others)

    if owner is not None:
        plugin = pm.get_plugin(owner)
        dist = next((d for p, d in pm.list_plugin_distinfo() if p is plugin), None)
        return Family(model_type, owner, dist.version if dist is not None else "builtin", False, _Hooks())
    blocked = blocked_plugins(pm)
    log.warning("no plugin handles this model_type; using the generic fallback", model_type=model_type,
                **({"not_loaded": ",".join(blocked), "because": LOAD_PLUGINS_ENV} if blocked else {}))
    return Family(model_type, GENERIC_PLUGIN, "builtin", True, _Hooks())


def installed_summary(pm: pluggy.PluginManager) -> str:
    """One line naming the installed family plugins and their model types (for error messages)."""
    parts = [f"{p.name} ({', '.join(p.model_types)})" for p in list_plugins(pm) if p.model_types]
    return "; ".join(parts) if parts else "none"
