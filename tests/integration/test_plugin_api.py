"""The plugin API does what hookspecs.py says: model hooks come from the model's family plugin only,
every hook call is traced, and a name two plugins provide (sampler, command, model type) is one loud error."""

from __future__ import annotations

import json
import types

import pytest

from qkcore import hookimpl
from qkcore.cli import main
from qkcore.config import load_config
from qkcore.errors import QkcoreError
from qkcore.stages.plan import build_sampler
from qkcore.plugins import TRACE_PLUGINS_ENV, make_plugin_manager, model_type_owners, resolve_family


def _plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin module called ``name`` implementing ``hooks`` (plain functions, marked here)."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def test_a_plugin_without_model_types_answers_no_model_hook() -> None:
    """Before: a plugin that declared no model types answered the model hooks of every model."""
    pm = make_plugin_manager()
    pm.register(_plugin("stray", qkcore_key_head=lambda query_head: 0,
                        qkcore_card_notes=lambda: ["stray note"]), name="stray")
    family = resolve_family(pm, "llama")
    assert family.plugin_name == "llama"
    assert family.hooks.qkcore_key_head(query_head=7, num_query_heads=8, num_key_value_heads=2) == 1  # generic GQA
    fallback = resolve_family(pm, "no-such-family")
    assert fallback.is_fallback
    assert fallback.hooks.qkcore_key_head(query_head=7, num_query_heads=8, num_key_value_heads=2) == 1
    assert "stray note" not in str(fallback.hooks.qkcore_card_notes(model=None, layers=[], plan=None))


def test_the_family_plugin_answers_its_model_hooks() -> None:
    pm = make_plugin_manager()
    pm.register(_plugin("owner", qkcore_model_types=lambda: ["toy"], qkcore_key_head=lambda query_head: 0), name="owner")
    family = resolve_family(pm, "toy")
    assert (family.plugin_name, family.is_fallback) == ("owner", False)
    assert family.hooks.qkcore_key_head(query_head=7, num_query_heads=8, num_key_value_heads=2) == 0
    # ...and only for its own model types.
    assert resolve_family(pm, "llama").hooks.qkcore_key_head(query_head=7, num_query_heads=8, num_key_value_heads=2) == 1


def test_model_types_are_asked_through_pluggy_so_the_trace_shows_them(monkeypatch, capsys) -> None:
    monkeypatch.setenv(TRACE_PLUGINS_ENV, "1")
    resolve_family(make_plugin_manager(), "llama")
    trace = capsys.readouterr().err.splitlines()
    assert "qkcore: trace: qkcore_model_types() -> llama" in trace
    assert "qkcore: trace: qkcore_model_types = [['llama']]" in [line.rsplit(" (", 1)[0] for line in trace]


def test_a_sampler_name_two_plugins_provide_is_an_error_naming_both(tiny_config) -> None:
    """Before: the second 'uniform' was silently ignored and the built-in won."""
    pm = make_plugin_manager()
    pm.register(_plugin("shadow", qkcore_samplers=lambda: {"uniform": object}), name="shadow")
    cfg = load_config(tiny_config())
    with pytest.raises(QkcoreError, match=r"the sampler 'uniform' is provided twice \((qkcore\.builtin and shadow|shadow and qkcore\.builtin)\); "
                                          r"uninstall one of the plugins, or leave it out with QKCORE_LOAD_PLUGINS"):
        build_sampler(pm, cfg)


def test_a_model_type_two_plugins_claim_is_an_error_naming_both() -> None:
    pm = make_plugin_manager()
    pm.register(_plugin("copycat", qkcore_model_types=lambda: ["llama"]), name="copycat")
    with pytest.raises(QkcoreError, match=r"the model type 'llama' is provided twice \((llama and copycat|copycat and llama)\); uninstall one"):
        model_type_owners(pm)
    with pytest.raises(QkcoreError, match="the model type 'llama' is provided twice"):
        resolve_family(pm, "qwen3")  # loud whichever model runs, as a clashing command is


def test_plugins_list_hook_shows_only_the_plugins_implementing_it(capsys) -> None:
    assert main(["plugins", "list", "--hook", "qkcore_locate_rope", "--json"]) == 0
    names = [info["name"] for info in json.loads(capsys.readouterr().out)]
    assert names[-1] == "qkcore.generic"  # trylast: the generic answers last
    assert {"gemma3", "qkcore.generic"} <= set(names) and "qkcore.builtin" not in names and "llama" not in names
    assert main(["plugins", "list", "--hook", "qkcore_samplers"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:2] == ["qkcore.builtin", "qkcore"]
    assert "1 plugins implement qkcore_samplers" in out


def test_plugins_list_hook_naming_no_hook_is_one_error_listing_the_hooks(capsys) -> None:
    assert main(["plugins", "list", "--hook", "qkcore_locate_rop"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no hook is called 'qkcore_locate_rop'" in err and "qkcore_locate_rope" in err
