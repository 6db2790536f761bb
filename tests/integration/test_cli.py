"""The command line end to end: config file → qkcore sniff → Parquet + card → load_dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import load_dataset

import qkcore
from qkcore.card import read_front_matter
from qkcore.cli import main
from tests.conftest import REPO, TEXTS, TINY_LLAMA


@pytest.mark.slow
def test_sniff_cli_writes_a_dataset_that_load_dataset_reads(tiny_config, tmp_path) -> None:
    config = tiny_config(capture={"head_sampling": {"count": 5, "seed": 0}, "sampler": {"type": "uniform", "base_rate": 8}})
    done = subprocess.run(
        [sys.executable, "-m", "qkcore", "sniff", "--config", str(config)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    root = tmp_path / "out"
    front, body = read_front_matter(root / "README.md")
    names = [entry["config_name"] for entry in front["configs"]]
    assert len([n for n in names if n.endswith("q")]) == 5
    assert all((root / name / "data.parquet").is_file() for name in names)
    model = front["qkcore"]["models"][0]
    assert model["name"] == "test/tiny" and model["documents"] == len(TEXTS)
    total = 0
    for name in names:
        rows = load_dataset(str(root), name, cache_dir=str(tmp_path / "cache"))["train"]
        assert rows.column_names == ["bucket", "example_id", "position", "vector", "sliding_window"]
        assert all(len(v) == TINY_LLAMA["head_dim"] for v in rows["vector"])
        total += len(rows)
    assert total > 0
    assert "load_dataset" in body


def test_plugins_list_shows_the_llama_plugin(capsys) -> None:
    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("llama "))
    assert "qk-plugin-llama" in line and "0.1.0" in line and line.rstrip().endswith("llama")
    assert "qkcore.plugins" in out


def _fails_cleanly(config: Path, capsys, *expected: str) -> None:
    assert main(["sniff", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("qkcore: error:")]
    assert len(errors) == 1, err
    for text in expected:
        assert text in errors[0], errors[0]
    assert not (config.parent / "out").exists(), "a failed run must write nothing"


def test_bad_key_fails_with_one_message_and_writes_nothing(tiny_config, capsys) -> None:
    config = tiny_config()
    raw = yaml.safe_load(config.read_text())
    raw["capture"]["samplr"] = {"type": "uniform"}
    config.write_text(yaml.safe_dump(raw))
    _fails_cleanly(config, capsys, "run.yaml", "capture.samplr")


def test_unknown_sampler_fails_with_one_message_and_writes_nothing(tiny_config, capsys) -> None:
    _fails_cleanly(tiny_config(capture={"sampler": {"type": "zipf"}}), capsys, "capture.sampler.type", "zipf", "uniform")


def test_unsupported_model_type_fails_with_one_message_and_writes_nothing(tiny_config, capsys) -> None:
    architecture = {"model_type": "no-such-model", "hidden_size": 8}
    _fails_cleanly(tiny_config(architecture=architecture), capsys, "no-such-model")


def test_uninstrumentable_model_names_installed_plugins(tiny_config, capsys) -> None:
    # GPT-2 attention has no q_proj/k_proj: no plugin and no generic route can capture it.
    gpt2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "vocab_size": 259, "n_positions": 512}
    _fails_cleanly(tiny_config(architecture=gpt2), capsys, "gpt2", "cannot be instrumented", "llama")


def test_missing_text_column_names_the_column(tiny_config, capsys) -> None:
    _fails_cleanly(tiny_config(dataset={"text_column": "body"}), capsys, "dataset.text_column", "body", "text")


def test_demo_config_loads_from_the_repository_root(monkeypatch) -> None:
    from qkcore.config import load_config

    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "demo" / "llama-tiny.yaml")
    assert cfg.capture.sampler.type == "uniform" and cfg.tokenizer.name == "qkcore:bytes"


# --------------------------------------------------------------------------- the command line itself

HEAVY = ("torch", "transformers", "datasets", "numpy", "pyarrow", "matplotlib", "pydantic")
_STARTUP = """
import sys
from qkcore.cli import main
code = main(sys.argv[1:])
print("HEAVY", code, sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["sniff", "--help"], ["plugins", "list"]])
def test_help_version_and_plugins_list_import_nothing_heavy(argv) -> None:
    # `qkcore --help` must answer at once: no torch, transformers or datasets before the arguments are parsed
    # (every installed plugin is loaded to list the commands, so their modules must be light too).
    done = subprocess.run([sys.executable, "-c", _STARTUP.format(heavy=HEAVY), *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "HEAVY 0 []"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sniff", "plan", "push"])
def test_a_config_error_is_reported_before_torch_is_imported(command, tmp_path) -> None:
    # A typo in the config must be reported at once, not after seconds of importing torch and transformers.
    config = tmp_path / "run.yaml"
    config.write_text("dataset: {path: corpus.jsonl}\nmodel: {name: org/model}\ncapture: {samplr: {type: all}}\n")
    done = subprocess.run([sys.executable, "-c", _STARTUP.format(heavy=("torch", "transformers", "datasets")),
                           command, "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert "capture.samplr" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout.splitlines()[-1] == "HEAVY 2 []"


def test_help_lists_every_built_in_command(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    commands = out[out.index("Commands:"):]
    for name in ("sniff", "push", "plan", "inspect", "plasticity", "plugins"):
        assert f"\n  {name} " in commands, out


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"qkcore {qkcore.__version__}\n"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "missing command"),
        (["snif"], "No such command 'snif'"),
        (["sniff"], "sniff: Missing option '--config'"),
        (["sniff", "--config", "run.yaml", "--frobnicate"], "sniff: No such option '--frobnicate'"),
        (["plugins"], "plugins: missing command"),
        (["plan", "--config", "run.yaml", "--documents", "0"], "plan: Invalid value for '--documents'"),
        (["plasticity", "data", "--locality", "2"], "plasticity: Invalid value for '--locality'"),
        (["inspect"], "inspect: Missing argument 'DATA_ROOT'"),
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(argv, expected, capsys) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qkcore: error: "), captured.err
    assert expected in lines[0] and "--help" in lines[0]
    assert captured.out == ""


def test_plugins_list_json_names_each_plugins_hooks(capsys) -> None:
    assert main(["plugins", "list", "--json"]) == 0
    plugins = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    llama = plugins["llama"]
    assert (llama["package"], llama["version"], llama["model_types"], llama["builtin"]) == (
        "qk-plugin-llama", "0.1.0", ["llama"], False)
    assert llama["hooks"] == ["qkcore_card_notes", "qkcore_model_types"]
    core = plugins["qkcore.builtin"]
    assert core["builtin"] and core["package"] == "qkcore" and core["version"] == qkcore.__version__
    assert core["hooks"] == ["qkcore_register_commands", "qkcore_samplers"]
    assert "qkcore_attention_layers" in plugins["qkcore.generic"]["hooks"]


@pytest.mark.parametrize("restart", [False, True])
def test_an_interrupt_says_how_to_resume(restart, tiny_config, capsys, monkeypatch) -> None:
    # After Ctrl-C, "the same command" would discard the progress again when it had --restart.
    import qkcore.sniff

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qkcore.sniff, "run_sniff", interrupted)
    argv = ["sniff", "--config", str(tiny_config()), *(["--restart"] if restart else [])]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("qkcore: error: interrupted; ") and "\n" not in err
    if restart:
        assert "without --restart to resume from the last commit" in err
    else:
        assert "the same command resumes from the last commit" in err


def test_an_error_of_several_lines_is_printed_as_one(tiny_config, capsys, monkeypatch) -> None:
    # A library's text quoted as a cause (transformers' offline advice, PyYAML's dump) must not spill over lines.
    import qkcore.sniff
    from qkcore.errors import QkcoreError

    def fails(*args, **kwargs):
        raise QkcoreError("tokenizer.name: cannot load 'x': We couldn't connect.\nCheck your connection.\n\n")

    monkeypatch.setattr(qkcore.sniff, "run_sniff", fails)
    assert main(["sniff", "--config", str(tiny_config())]) == 2
    assert capsys.readouterr().err == (
        "qkcore: error: tokenizer.name: cannot load 'x': We couldn't connect.; Check your connection.\n")
