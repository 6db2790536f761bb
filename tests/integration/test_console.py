"""Console output: log lines above one live progress line; quiet, debug and JSON modes."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import termios
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_corpus

_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z \[(\w+)\s*\] ")


def _config(tiny_config, tmp_path: Path) -> Path:
    corpus = write_corpus(tmp_path / "docs.jsonl", [(f"d{i}", f"words {i} " * (20 + i)) for i in range(10)])
    return tiny_config(dataset={"path": str(corpus)}, inference={"batch_size": 1},
                       output={"data_root": str(tmp_path / "out"), "commit_every_s": 0})


def _run(config: Path, *flags: str) -> str:
    done = subprocess.run([sys.executable, "-m", "qkcore", "sniff", "--config", str(config), *flags],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow
def test_without_a_terminal_there_is_no_bar_and_each_commit_says_how_far(tiny_config, tmp_path) -> None:
    err = _run(_config(tiny_config, tmp_path))
    assert "%|" not in err and "doc/s" not in err  # no progress bar in a log file
    levels = [m.group(1) for line in err.splitlines() if (m := _LOG_LINE.match(line))]
    assert "debug" not in levels
    progress = [line for line in err.splitlines() if "] progress " in line]
    assert len(progress) == 10 and "documents=10 " in progress[-1] and "of=10" in progress[-1]
    assert "batch captured" not in err


@pytest.mark.slow
def test_debug_adds_a_line_per_batch_and_quiet_shows_only_warnings(tiny_config, tmp_path) -> None:
    config = _config(tiny_config, tmp_path)
    err = _run(config, "--debug", "--restart")
    batches = [line for line in err.splitlines() if "batch captured" in line]
    assert len(batches) == 10 and all("[debug" in line and "batch_tokens=" in line for line in batches)
    err = _run(config, "--quiet", "--restart")
    assert not [line for line in err.splitlines() if _LOG_LINE.match(line) and "[warning" not in line]


@pytest.mark.slow
def test_json_logs_are_one_object_per_line(tiny_config, tmp_path) -> None:
    err = _run(_config(tiny_config, tmp_path), "--json-logs")
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    events = [r["event"] for r in records]
    assert "capture planned" in events and "capture written" in events
    assert all("level" in r and "timestamp" in r and "run_id" not in r for r in records)
    key = json.loads((tmp_path / "out" / "qkcore.json").read_text())["run_key"]
    assert {r.get("run_key") for r in records if r["event"] in ("capture planned", "capture written")} == {key}
    assert "%|" not in err


@pytest.mark.slow
def test_on_a_terminal_log_lines_print_above_the_one_live_bar(tiny_config, tmp_path) -> None:
    """Every log line starts on a line of its own: no frozen copy of the bar glued in front of it.

    ``--debug`` logs a line per batch while the bar is live.
    """
    config = _config(tiny_config, tmp_path)
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    child = subprocess.Popen([sys.executable, "-m", "qkcore", "sniff", "--config", str(config), "--debug"],
                             stdin=subprocess.DEVNULL,
                             stdout=follower, stderr=follower, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    assert child.wait(timeout=300) == 0
    text = output.decode("utf-8", "replace")
    assert "doc/s" in text or "doc]" in text  # the bar was drawn
    assert text.count("batch captured") == 10
    for line in text.replace("\r\n", "\n").split("\n"):
        if re.search(r" \[(debug|info|warning)\s*\] ", line):
            shown = line.split("\r")[-1]  # what stays on screen after carriage returns
            assert _LOG_LINE.match(shown), repr(line)
            assert "%|" not in shown, repr(line)


@pytest.mark.slow
def test_without_a_terminal_the_libraries_draw_no_bars_either(tiny_config, tmp_path) -> None:
    """transformers' weight loading and GGUF dequantizing bars would print a line per update into a log."""
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'qkcore[gguf]')")
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'qkcore[gguf]')")
    from tests.gguf_tiny import write_tiny_llama_gguf

    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    config = tiny_config(model={"name": None, "config": None, "gguf_file": str(gguf)}, tokenizer={"name": None})
    err = _run(config)
    assert "it/s" not in err and "de-quantizing" not in err and "%|" not in err, err[-2000:]


@pytest.mark.slow
def test_plasticity_draws_no_bar_into_a_log_file(tiny_config, tmp_path) -> None:
    _run(_config(tiny_config, tmp_path))
    done = subprocess.run([sys.executable, "-m", "qkcore", "plasticity", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "%|" not in done.stderr and "head/s" not in done.stderr


def test_log_lines_name_the_run_by_its_run_key_as_the_card_does(tiny_config, tmp_path, capsys) -> None:
    # One name for one thing: no random run id in the logs beside the card's run key.
    from qkcore.cli import main

    assert main(["sniff", "--config", str(_config(tiny_config, tmp_path)), "--json-logs"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    key = json.loads((tmp_path / "out" / "qkcore.json").read_text())["run_key"]
    assert records and not [r for r in records if "run_id" in r]
    written = next(r for r in records if r["event"] == "capture written")
    assert written["run_key"] == key
