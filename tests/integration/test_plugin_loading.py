"""Plugins load through pluggy: broken or unknown plugins are one clear error, QKCORE_LOAD_PLUGINS
restricts what loads, QKCORE_TRACE_PLUGINS traces hook calls, and plugins add commands through a hook."""

from __future__ import annotations

import itertools
import subprocess
import sys
import types

import click
import pytest

import qkcore
from qkcore import hookimpl
from qkcore.cli import main
from qkcore.errors import QkcoreError
from qkcore.plugins import LOAD_PLUGINS_ENV, TRACE_PLUGINS_ENV, list_plugins, make_plugin_manager, resolve_family

FAMILIES = {"gemma3", "glm", "llama", "ministral", "mllama", "qwen2", "qwen3", "smollm3"}
_unique = itertools.count()


def _entry_point_plugins(pm) -> set[str]:
    return {info.name for info in list_plugins(pm) if not info.builtin}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("qkcore: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install a fake distribution on sys.path: ``installed({"name": "module source", ...})`` -> (package, names).

    Each entry becomes a module and a ``qkcore.plugins`` entry point of one
    distribution, in the given order; names are made unique per call.
    """
    created: list[str] = []

    def install(plugins: dict[str, str]) -> tuple[str, dict[str, str]]:
        n = next(_unique)
        package, folder = f"qk-fake-{n}", tmp_path / f"site{n}"
        info = folder / f"qk_fake_{n}-1.2.3.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.2.3\n", encoding="utf-8")
        names, lines = {}, ["[qkcore.plugins]"]
        for name, source in plugins.items():
            unique, module = f"{name}{n}", f"qk_fake_{name}_{n}"
            (folder / f"{module}.py").write_text(source, encoding="utf-8")
            lines.append(f"{unique} = {module}")
            names[name] = unique
            created.append(module)
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        monkeypatch.syspath_prepend(str(folder))
        return package, names

    yield install
    for module in created:
        sys.modules.pop(module, None)


GOOD = "from qkcore import hookimpl\n\n@hookimpl\ndef qkcore_model_types():\n    return ['fake-family']\n"
BROKEN = "import qkcore_no_such_dependency\n"


def test_a_plugin_that_fails_to_import_is_named_with_its_package_and_version(installed, capsys) -> None:
    # The broken entry point comes after a good one of the same package: the error must name the broken one.
    package, names = installed({"good": GOOD, "broken": BROKEN})
    with pytest.raises(QkcoreError) as error:
        make_plugin_manager()
    message = str(error.value)
    assert f"plugin '{names['broken']}' from package {package} 1.2.3 failed to load" in message
    assert "ModuleNotFoundError" in message and "qkcore_no_such_dependency" in message
    assert f"pip uninstall {package}" in message and names["good"] not in message
    assert main(["plugins", "list"]) == 2
    assert f"plugin '{names['broken']}'" in _one_error_line(capsys)


def test_a_hook_no_hookspec_declares_is_an_error(installed) -> None:
    # qkcore_analyses was the analyses hook before qkcore_register_commands; a typo is caught the same way.
    package, names = installed({"stale": "from qkcore import hookimpl\n\n@hookimpl\ndef qkcore_analyses():\n    return {}\n"})
    with pytest.raises(QkcoreError, match=rf"plugin '{names['stale']}' from package {package} 1.2.3: .*qkcore_analyses"):
        make_plugin_manager()


def test_entry_point_plugins_come_with_their_distribution(installed) -> None:
    package, names = installed({"good": GOOD})
    info = next(p for p in list_plugins(make_plugin_manager()) if p.name == names["good"])
    assert (info.package, info.version, info.model_types, info.hooks) == (package, "1.2.3", ("fake-family",), ("qkcore_model_types",))
    family = resolve_family(make_plugin_manager(), "fake-family")
    assert (family.plugin_name, family.plugin_version, family.is_fallback) == (names["good"], "1.2.3", False)


def test_load_plugins_restricts_to_the_named_ones(monkeypatch, capsys) -> None:
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "llama, qwen3")
    pm = make_plugin_manager()
    assert _entry_point_plugins(pm) == {"llama", "qwen3"}
    assert {info.name for info in list_plugins(pm) if info.builtin} == {"qkcore.builtin", "qkcore.generic"}
    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    assert "Not loaded (QKCORE_LOAD_PLUGINS): gemma3, glm, ministral, mllama, qwen2, smollm3" in out


def test_load_plugins_empty_loads_only_the_core(monkeypatch) -> None:
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "")
    pm = make_plugin_manager()
    assert _entry_point_plugins(pm) == set()
    assert resolve_family(pm, "llama").is_fallback
    assert pm.hook.qkcore_samplers()  # the core's own plugins are still there


def test_load_plugins_unset_loads_every_installed_plugin(monkeypatch) -> None:
    monkeypatch.delenv(LOAD_PLUGINS_ENV, raising=False)
    assert FAMILIES <= _entry_point_plugins(make_plugin_manager())


def test_load_plugins_naming_no_installed_plugin_is_an_error(monkeypatch, capsys) -> None:
    monkeypatch.setenv(LOAD_PLUGINS_ENV, "llama,lama")
    assert main(["plugins", "list"]) == 2
    line = _one_error_line(capsys)
    assert "QKCORE_LOAD_PLUGINS" in line and "'lama'" in line and "installed: gemma3, glm, llama" in line


def test_a_bad_switch_value_is_an_error(monkeypatch, capsys) -> None:
    monkeypatch.setenv(TRACE_PLUGINS_ENV, "maybe")
    assert main(["plugins", "list"]) == 2
    assert "QKCORE_TRACE_PLUGINS='maybe': expected 1 or 0" in _one_error_line(capsys)


def test_trace_plugins_prints_each_hook_call_briefly(monkeypatch, tiny_config, capsys) -> None:
    monkeypatch.setenv(TRACE_PLUGINS_ENV, "1")
    assert main(["plan", "--config", str(tiny_config()), "--lengths", "64"]) == 0
    trace = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qkcore: trace: ")]
    assert "qkcore: trace: qkcore_register_commands(cli=<QkcoreCli>) -> qkcore.builtin" in trace
    assert "qkcore: trace: qkcore_model_class(config=<LlamaConfig>) -> qkcore.generic" in trace
    assert "qkcore: trace: qkcore_attention_layers(model=<LlamaForCausalLM>) -> qkcore.generic" in trace
    assert any(line.startswith("qkcore: trace: qkcore_key_head = ") and line.endswith(" ms)") for line in trace)
    assert max(len(line) for line in trace) < 300  # arguments and results are described, never printed whole
    monkeypatch.delenv(TRACE_PLUGINS_ENV)
    assert main(["plugins", "list"]) == 0
    assert "qkcore: trace:" not in capsys.readouterr().err


def _command_plugin(name: str) -> types.ModuleType:
    """A plugin adding ``qkcore <name>``, which prints the plugins its plugin manager holds."""
    plugin = types.ModuleType(f"qk_plugin_{name}")

    @hookimpl
    def qkcore_register_commands(cli: click.Group) -> None:
        @cli.command(name)
        @click.argument("who")
        @click.pass_obj
        def command(pm, who: str) -> None:
            """Greet WHO."""
            click.echo(f"hello {who} from {pm.get_name(plugin)}")

    plugin.qkcore_register_commands = qkcore_register_commands
    return plugin


def test_a_plugin_adds_a_command_through_the_hook(capsys) -> None:
    pm = make_plugin_manager()
    pm.register(_command_plugin("greet"), name="greeter")
    assert main(["greet", "world"], pm=pm) == 0
    assert capsys.readouterr().out == "hello world from greeter\n"
    assert main(["--help"], pm=pm) == 0
    assert "  greet " in capsys.readouterr().out
    assert main(["greet"], pm=pm) == 2  # its usage errors are one line too
    assert "greet: Missing argument 'WHO'" in _one_error_line(capsys)


def test_a_plugin_command_clashing_with_a_built_in_is_an_error(capsys) -> None:
    pm = make_plugin_manager()
    pm.register(_command_plugin("sniff"), name="shadow")
    assert main(["sniff", "--config", "run.yaml"], pm=pm) == 2
    line = _one_error_line(capsys)
    assert "the command 'sniff' is provided twice" in line and "qkcore.commands.run" in line and __name__ in line


@pytest.mark.slow
def test_python_dash_m_qkcore_answers(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "qkcore", "--version"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"qkcore {qkcore.__version__}\n", "")
