"""Sweeps that survive: kill -9 and resume, torchrun with 2 processes, flat host memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qkcore.config import load_config
from qkcore.output import LocalDataRoot
from qkcore.sniff import run_sniff
from qkcore.writer import JOURNAL_FILE
from tests.conftest import write_corpus

pytestmark = pytest.mark.slow  # subprocesses: kill -9, torchrun, peak RSS

WORDS = "tide gauge sluice harbour lantern glacier stake orchard graft relay hop loom warp heddle reed".split()


def _corpus(path: Path, documents: int, words: int) -> Path:
    texts = []
    for d in range(documents):
        body = " ".join(WORDS[(d * 7 + i * 3) % len(WORDS)] for i in range(words + (d % 5) * 9))
        texts.append((f"doc-{d:04d}", body))
    return write_corpus(path, texts)


def _sniff_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qkcore", "sniff", "--config", str(config), *extra]


def _parquet_bytes(root: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(root.glob("l*/data.parquet"))}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_kill_9_then_same_command_resumes_to_identical_files(tiny_config, tmp_path) -> None:
    corpus = _corpus(tmp_path / "many.jsonl", documents=160, words=40)
    sections = dict(
        dataset={"path": str(corpus)},
        capture={"sampler": {"type": "all"}, "head_sampling": {"count": 6, "seed": 1}},
        inference={"batch_size": 2},
    )
    config = tiny_config(output={"data_root": str(tmp_path / "killed"), "commit_every_s": 0, "flush_threshold_mb": 1},
                         **sections)
    journal = LocalDataRoot(tmp_path / "killed").staging_dir / JOURNAL_FILE
    child = subprocess.Popen(_sniff_command(config), cwd=tmp_path, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    committed = 0
    while time.monotonic() < deadline and child.poll() is None:
        try:
            committed = json.loads(journal.read_text())["state"]["documents"]
        except (OSError, ValueError, KeyError):
            committed = 0
        if committed >= 12:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the run finished before it could be killed; make the corpus longer"
    assert 12 <= committed < 160

    resumed = subprocess.run(_sniff_command(config), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr

    reference = tiny_config(output={"data_root": str(tmp_path / "reference")}, **sections)
    run_sniff(load_config(reference))
    killed, clean = _parquet_bytes(tmp_path / "killed"), _parquet_bytes(tmp_path / "reference")
    assert killed.keys() == clean.keys() and killed == clean
    assert not LocalDataRoot(tmp_path / "killed").staging_dir.exists()

    again = subprocess.run(_sniff_command(config), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stderr
    assert _parquet_bytes(tmp_path / "killed") == clean


def test_torchrun_two_processes_equal_a_single_process_run(tiny_config, tmp_path) -> None:
    """Whole batches go to ranks, formed as one process forms them: byte-identical files at batch_size 3.

    Documents have uneven lengths, so a batch's padding (and float results) would differ if ranks
    batched their documents differently from a single process.
    """
    corpus = _corpus(tmp_path / "docs.jsonl", documents=10, words=30)
    sections = dict(dataset={"path": str(corpus)}, inference={"batch_size": 3},
                    capture={"sampler": {"type": "uniform", "base_rate": 4}, "head_sampling": {"count": 7, "seed": 2}})
    config = tiny_config(output={"data_root": str(tmp_path / "ranks")}, **sections)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "qkcore", "sniff", "--config", str(config)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    single = run_sniff(load_config(tiny_config(output={"data_root": str(tmp_path / "single")}, **sections)))
    merged = _parquet_bytes(tmp_path / "ranks")
    assert merged.keys() == set(single.rows) and merged == _parquet_bytes(tmp_path / "single")
    assert not LocalDataRoot(tmp_path / "ranks").ranks_dir.exists()
    from qkcore.card import read_front_matter

    front, _ = read_front_matter(tmp_path / "ranks" / "README.md")
    assert front["qkcore"]["models"][0]["documents"] == 10


_PEAK = """
import sys
from qkcore.cli import main
code = main(["sniff", "--config", sys.argv[1]])
status = open("/proc/self/status").read()
print("VmHWM", [l.split()[1] for l in status.splitlines() if l.startswith("VmHWM")][0], code)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_host_memory_stays_flat_with_sampler_all(tiny_config, tmp_path) -> None:
    """Peak RSS barely moves when the captured data grows 5×: rows stream to disk.

    The writer's bound is the flush threshold plus about two row groups (see
    DatasetWriter); both are set small here so the data dwarfs them.
    """
    architecture = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 259}
    peaks, data = {}, {}
    for documents in (15, 75):
        corpus = _corpus(tmp_path / f"c{documents}.jsonl", documents=documents, words=110)
        root = tmp_path / f"m{documents}"
        config = tiny_config(architecture, dataset={"path": str(corpus)}, capture={"sampler": {"type": "all"}},
                             output={"data_root": str(root), "flush_threshold_mb": 2, "write_batch_size": 1024})
        done = subprocess.run([sys.executable, "-c", _PEAK, str(config)], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        line = next(l for l in done.stdout.splitlines() if l.startswith("VmHWM"))
        peaks[documents] = int(line.split()[1].strip("'")) / 1024  # MiB
        data[documents] = (documents, _captured_mib(root))
    growth = peaks[75] - peaks[15]
    captured_growth = data[75][1] - data[15][1]
    assert captured_growth > 60, f"test too small to show anything: captured {captured_growth:.0f} MiB more"
    print(f"peak RSS {peaks[15]:.0f} -> {peaks[75]:.0f} MiB for {data[15][1]:.0f} -> {data[75][1]:.0f} MiB captured")
    assert growth < 0.25 * captured_growth, f"peak RSS grew {growth:.0f} MiB for {captured_growth:.0f} MiB more rows"


def _captured_mib(root: Path) -> float:
    import pyarrow.parquet as pq

    total = 0
    for path in root.glob("l*/data.parquet"):
        meta = pq.ParquetFile(path).metadata
        head_dim = pq.read_schema(path).field("vector").type.list_size
        total += meta.num_rows * (head_dim * 4 + 16)
    return total / 2**20
