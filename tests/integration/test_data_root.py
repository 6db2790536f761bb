"""Nothing lost, nothing mixed: one run per data root, run identity, the finish protocol, the lock.

Each test reproduces a defect found by running qkcore as a new user would (a tiny Llama and
a small corpus) and pins the behaviour that replaced it. Runs go through the CLI
(``qkcore.cli.main``) so what is checked is what a user sees: the exit status, one
``qkcore: error:`` line, and the bytes of the data root.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from qkcore.card import read_front_matter
from qkcore.cli import main
from qkcore.manifest import read_manifest
from qkcore.output import LocalDataRoot
from qkcore.writer import JOURNAL_FILE, DatasetWriter
from tests.conftest import TEXTS, error_line, sniff, write_corpus

ALL_SEED_0 = {"sampler": {"type": "all"}, "head_sampling": {"count": 6, "seed": 0}}
UNIFORM_SEED_7 = {"sampler": {"type": "uniform", "base_rate": 4}, "head_sampling": {"count": 6, "seed": 7}}


def tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: "no byte changes" compares these.

    The lock files and the hash caches (``hashes.json``, ``verified.json``) record nothing
    about a run and are left out.
    """
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("lock", "lock.json", "hashes.json", "verified.json")
    }


def published(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob("l*/data.parquet"))


def card(root: Path) -> dict:
    return read_front_matter(root / "README.md")[0]


# --------------------------------------------------------------------------- 1. two runs, one root


def test_a_second_run_into_a_finished_root_is_refused_naming_both_runs(tiny_config, tmp_path) -> None:
    root = tmp_path / "out"
    assert sniff(tiny_config(capture=ALL_SEED_0))[0] == 0
    run_a = card(root)["qkcore"]["run_key"]
    before = tree(root)
    code, err = sniff(tiny_config(capture=UNIFORM_SEED_7))
    line = error_line(err)
    assert code == 2
    assert f"holds run {run_a} (test/tiny" in line and "this config is a different run" in line
    assert "capture.head_sampling.seed (0 -> 7)" in line and "capture.sampler.type (all -> uniform)" in line
    assert "--replace" in line
    assert tree(root) == before


def test_replace_discards_the_previous_run_and_the_card_describes_exactly_the_files(tiny_config, tmp_path) -> None:
    root = tmp_path / "out"
    assert sniff(tiny_config(capture=ALL_SEED_0))[0] == 0
    run_a_configs = published(root)
    assert sniff(tiny_config(capture=UNIFORM_SEED_7), "--replace")[0] == 0
    front = card(root)
    names = [c["config_name"] for c in front["configs"]]
    assert names == published(root) != run_a_configs
    assert sorted(read_manifest(root / "qkcore.json").configs) == names
    models = front["qkcore"]["models"]
    assert len(models) == 1 and models[0]["sampler"]["type"] == "uniform"
    assert models[0]["capture"]["head_sampling"]["seed"] == 7
    assert LocalDataRoot(root).verify(LocalDataRoot(root).read_record()) == []


def test_a_different_model_into_the_same_root_is_refused(tiny_config, tmp_path) -> None:
    root = tmp_path / "out"
    assert sniff(tiny_config(capture=ALL_SEED_0))[0] == 0
    before = tree(root)
    bigger = {**yaml.safe_load((tmp_path / "run.yaml").read_text())["model"]["config"], "num_hidden_layers": 4}
    code, err = sniff(tiny_config(bigger, capture=ALL_SEED_0))
    assert code == 2 and "model.weights.config_sha256" in error_line(err)
    assert tree(root) == before


def test_files_no_run_recorded_count_as_a_previous_run(tiny_config, tmp_path) -> None:
    root = tmp_path / "out"
    (root / "l00h00q").mkdir(parents=True)
    (root / "l00h00q" / "data.parquet").write_bytes(b"someone else's rows")
    (root / "README.md").write_text("---\nconfigs: [unclosed\n", encoding="utf-8")
    before = tree(root)
    code, err = sniff(tiny_config(capture=ALL_SEED_0))
    line = error_line(err)
    assert code == 2 and "no qkcore run recorded" in line and "README.md" in line and "--replace" in line
    assert tree(root) == before
    assert sniff(tiny_config(capture=ALL_SEED_0), "--replace")[0] == 0
    assert all(b"someone else's rows" != (root / n / "data.parquet").read_bytes() for n in published(root))
    assert [c["config_name"] for c in card(root)["configs"]] == published(root)


# --------------------------------------------------------------------------- 2. identity includes the data


def test_an_edited_corpus_is_a_different_run_not_already_complete(tiny_config, tmp_path) -> None:
    root = tmp_path / "out"
    config = tiny_config(capture=ALL_SEED_0)
    assert sniff(config)[0] == 0
    before = tree(root)
    edited = [(i, text + " (edited)") if n == 2 else (i, text) for n, (i, text) in enumerate(TEXTS)]
    write_corpus(tmp_path / "corpus.jsonl", edited)
    code, err = sniff(config)
    line = error_line(err)
    assert code == 2 and "dataset.documents.sha256" in line and "already complete" not in err
    assert tree(root) == before


def test_a_corpus_changed_between_a_kill_and_the_resume_is_refused(tiny_config, tmp_path, monkeypatch) -> None:
    corpus = write_corpus(tmp_path / "long.jsonl", [(f"d{i}", f"text {i} " * (5 + i)) for i in range(12)])
    config = tiny_config(dataset={"path": str(corpus)}, capture=ALL_SEED_0, output={"data_root": str(tmp_path / "out"), "commit_every_s": 0})
    from qkcore.stages.capture import Sniffer

    real, batches = Sniffer.capture_batch, []

    def interrupted(self, batch, selections=None):
        if len(batches) == 3:
            raise KeyboardInterrupt
        batches.append(batch)
        return real(self, batch, selections)

    monkeypatch.setattr(Sniffer, "capture_batch", interrupted)
    code, err = sniff(config)
    assert code == 130 and "interrupted; the same command resumes" in err
    monkeypatch.setattr(Sniffer, "capture_batch", real)
    staged = json.loads((LocalDataRoot(tmp_path / "out").staging_dir / JOURNAL_FILE).read_text())
    assert staged["state"]["documents"] == 6
    lines = corpus.read_text().splitlines()
    corpus.write_text("\n".join(reversed(lines)) + "\n")
    before = tree(tmp_path / "out")
    code, err = sniff(config)
    line = error_line(err)
    assert code == 2 and "holds the unfinished run" in line and "6 documents captured" in line
    assert "dataset.documents.sha256" in line and "--restart" in line
    assert tree(tmp_path / "out") == before


def test_interrupted_then_same_command_resumes_to_identical_files(tiny_config, tmp_path, monkeypatch) -> None:
    corpus = write_corpus(tmp_path / "long.jsonl", [(f"d{i}", f"text {i} " * (5 + i)) for i in range(12)])
    sections = dict(dataset={"path": str(corpus)}, capture=ALL_SEED_0)
    config = tiny_config(**sections, output={"data_root": str(tmp_path / "out"), "commit_every_s": 0})
    from qkcore.stages.capture import Sniffer

    real, seen = Sniffer.capture_batch, []

    def interrupted(self, batch, selections=None):
        if len(seen) == 2:
            raise KeyboardInterrupt
        seen.append(1)
        return real(self, batch, selections)

    monkeypatch.setattr(Sniffer, "capture_batch", interrupted)
    assert sniff(config)[0] == 130
    monkeypatch.setattr(Sniffer, "capture_batch", real)
    code, err = sniff(config)
    assert code == 0 and "resuming" in err
    resumed = {n: (tmp_path / "out" / n / "data.parquet").read_bytes() for n in published(tmp_path / "out")}
    assert sniff(tiny_config(**sections, output={"data_root": str(tmp_path / "ref")}))[0] == 0
    assert resumed == {n: (tmp_path / "ref" / n / "data.parquet").read_bytes() for n in published(tmp_path / "ref")}


# --------------------------------------------------------------------------- 3 and 5. documents


@pytest.mark.parametrize("streaming", [False, True])
def test_duplicate_example_ids_are_refused_naming_the_id_and_both_rows(tiny_config, tmp_path, streaming) -> None:
    texts = [("a", "first text"), ("b", "second"), ("a", "a different text under the same id")]
    corpus = write_corpus(tmp_path / "dup.jsonl", texts)
    code, err = sniff(tiny_config(dataset={"path": str(corpus), "streaming": streaming}))
    line = error_line(err)
    assert code == 2 and "rows 0 and 2" in line and "example id 'a'" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"id": 1, "text": "fine"}, {"id": 2, "text": None}], "row 1 (id 2)"),
        ([{"id": 1, "text": "fine"}, {"id": 2, "text": 12345}], "a int (12345), not text"),
        ([{"id": 1, "text": ["a", "list"]}, {"id": 2, "text": ["b"]}], "row 0 (id 1)"),
        ([{"id": 1, "text": ""}, {"id": 2, "text": ""}], "all 2 texts in column 'text' are empty"),
    ],
    ids=["null", "integer", "list", "all-empty"],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_bad_text_values_are_errors_naming_the_row(tiny_config, tmp_path, rows, expected, streaming) -> None:
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, err = sniff(tiny_config(dataset={"path": str(corpus), "streaming": streaming}))
    line = error_line(err)
    assert code == 2 and "dataset.text_column" in line
    if streaming and expected.startswith("all"):
        assert "none of the 2 documents read has any tokens" in line  # known only once read
    elif streaming and "int" in expected:
        assert "row 1 (id 2)" in line  # streaming rows keep their type: reported as read
    else:
        assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_empty_texts_are_skipped_counted_and_recorded(tiny_config, tmp_path) -> None:
    corpus = write_corpus(tmp_path / "some-empty.jsonl", [("a", "some text"), ("b", ""), ("c", "more text"), ("d", "")])
    code, err = sniff(tiny_config(dataset={"path": str(corpus)}))
    assert code == 0 and "skipped=2" in err
    model = card(tmp_path / "out")["qkcore"]["models"][0]
    assert (model["documents"], model["skipped_documents"]) == (2, 2)
    assert "2 documents had no tokens" in (tmp_path / "out" / "README.md").read_text()


def test_capturing_neither_queries_nor_keys_is_refused_before_any_compute(tiny_config, tmp_path) -> None:
    code, err = sniff(tiny_config(capture={"capture_queries": False, "capture_keys": False}))
    assert code == 2 and "nothing would be captured" in error_line(err)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 6. precision and non-finite rows


def test_non_finite_rows_are_counted_warned_and_recorded(tiny_config, tmp_path) -> None:
    import torch

    from qkcore.config import load_config
    from qkcore.stages.capture import Sniffer

    config = tiny_config(capture={"sampler": {"type": "all"}, "layers": [0]})
    real_init = Sniffer.__init__

    def poisoned(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        with torch.no_grad():  # an fp16 overflow, in effect: one query head's projection is inf
            self.model.model.layers[0].self_attn.q_proj.weight[:8] = float("inf")

    Sniffer.__init__ = poisoned
    try:
        code, err = sniff(config)
    finally:
        Sniffer.__init__ = real_init
    assert code == 0 and "captured rows hold NaN or infinity" in err
    manifest = read_manifest(tmp_path / "out" / "qkcore.json")
    bad = {name: s.nonfinite_rows for name, s in manifest.configs.items() if s.nonfinite_rows}
    assert bad and set(bad) == {"l00h00q"} and bad["l00h00q"] == manifest.configs["l00h00q"].rows
    model = card(tmp_path / "out")["qkcore"]["models"][0]
    assert model["nonfinite_rows"] == bad["l00h00q"]
    assert "rows hold a NaN or an infinity" in (tmp_path / "out" / "README.md").read_text()
    del load_config


def test_the_card_records_precision_tokenizer_batch_size_and_versions(tiny_config, tmp_path) -> None:
    import torch
    import transformers

    assert sniff(tiny_config())[0] == 0
    model = card(tmp_path / "out")["qkcore"]["models"][0]
    assert model["precision"] == {"requested_dtype": "float32", "effective_dtype": "float32", "note": None,
                                  "dtype": "float32", "attn_implementation": "sdpa", "device": "cpu",
                                  "autocast": None, "batch_size": 2}
    assert model["tokenizer"] == {"name": "qkcore:bytes", "revision": None, "max_length": 512}
    assert model["versions"] == {"torch": str(torch.__version__), "transformers": transformers.__version__}
    assert model["weights"]["source"] == "random"
    assert str(tmp_path) not in (tmp_path / "out" / "README.md").read_text()  # no machine paths


# --------------------------------------------------------------------------- 7, 8. the finish windows

_KILL_AT = r"""
import os, signal, sys
import qkcore.output.local as dataroot
import qkcore.writer as writer
from qkcore.cli import main

moment, config = sys.argv[1], sys.argv[2]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if moment == "finalized":  # final files, card and manifest written and journaled; nothing published
    drop = writer.DatasetWriter.drop_parts
    writer.DatasetWriter.drop_parts = lambda self: (drop(self), die())
elif moment == "dropping-parts":  # journal rewritten without parts, the parts half deleted
    rewrite = writer.DatasetWriter._write_journal
    def _write_journal(self, parts, state, **kw):
        rewrite(self, parts, state, **kw)
        if state.get("phase") == "finalized" and not parts:
            part = sorted(self.staging_dir.glob("part-*.arrow"))[0]
            part.unlink()
            die()
    writer.DatasetWriter._write_journal = _write_journal
elif moment == "mid-publish":  # the record says "publishing"; 3 files moved in, the rest waiting
    move, moved = dataroot.move_durably, []
    def move_durably(source, target):
        move(source, target)
        moved.append(target)
        if len(moved) == 3:
            die()
    dataroot.move_durably = move_durably
elif moment == "removing-staging":  # the record says "complete"; the staging folder half removed
    remove = writer.remove_tree
    def remove_tree(path):
        journal = path / "journal.json"
        if journal.exists():
            journal.unlink()
            die()
        remove(path)
    writer.remove_tree = remove_tree
sys.exit(main(["sniff", "--config", config]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["finalized", "dropping-parts", "mid-publish", "removing-staging"])
def test_a_kill_in_the_finish_resumes_without_recapturing(tiny_config, tmp_path, moment) -> None:
    sections = dict(capture=ALL_SEED_0, output={"data_root": str(tmp_path / "out"), "commit_every_s": 0})
    config = tiny_config(**sections)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", _KILL_AT, moment, str(config)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    root = LocalDataRoot(tmp_path / "out")
    if moment == "mid-publish":  # a root half-way through publishing is not pushed, nor taken for complete
        assert root.read_record().state == "publishing"
    again = subprocess.run([sys.executable, "-m", "qkcore", "sniff", "--config", str(config)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "batch captured" not in again.stderr and "capture planned" not in again.stderr  # no model, no capture
    expected = "already complete" if moment == "removing-staging" else "resuming the publish"
    assert expected in again.stderr
    assert sniff(tiny_config(capture=ALL_SEED_0, output={"data_root": str(tmp_path / "ref")}))[0] == 0
    files = {n: (tmp_path / "out" / n / "data.parquet").read_bytes() for n in published(tmp_path / "out")}
    assert files == {n: (tmp_path / "ref" / n / "data.parquet").read_bytes() for n in published(tmp_path / "ref")}
    assert not root.staging_dir.exists() and not root.final_dir.exists()
    assert root.read_record().state == "complete" and root.verify(root.read_record()) == []


# --------------------------------------------------------------------------- 9. one process per root

_HOLD = r"""
import sys, time
from pathlib import Path
from qkcore.cli import main
from qkcore.stages.capture import Sniffer

gate = Path(sys.argv[2])
real = Sniffer.capture_batch
def capture_batch(self, batch, selections=None):
    print("capturing", flush=True)
    while not gate.exists():
        time.sleep(0.05)
    return real(self, batch, selections)
Sniffer.capture_batch = capture_batch
sys.exit(main(["sniff", "--config", sys.argv[1]]))
"""


@pytest.mark.slow
def test_a_second_process_on_the_same_root_fails_at_once_naming_the_holder(tiny_config, tmp_path) -> None:
    config = tiny_config(capture=ALL_SEED_0)
    gate = tmp_path / "gate"
    first = subprocess.Popen([sys.executable, "-c", _HOLD, str(config), str(gate)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "capturing"
        started = time.monotonic()
        code, err = sniff(config)
        line = error_line(err)
        assert code == 2 and time.monotonic() - started < 30
        assert f"is in use by process {first.pid} on" in line and "qkcore sniff --config" in line or "-c" in line
    finally:
        gate.touch()
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-3000:]
    code, err = sniff(config)
    assert code == 0 and "already complete" in err


# --------------------------------------------------------------------------- 10. torchrun leftovers


def test_a_crashed_torchrun_runs_staging_is_not_ignored_by_a_single_process(tiny_config, tmp_path) -> None:
    config = tiny_config(capture=ALL_SEED_0)
    root = LocalDataRoot(tmp_path / "out")
    for rank in (0, 1):  # what two killed ranks leave: committed journals in .qkcore/ranks/
        writer = DatasetWriter(root.rank_staging(rank), run_key="0123456789abcdef")
        writer.commit({"documents": 1})
        writer.abort()
    before = tree(root.path)
    code, err = sniff(config)
    line = error_line(err)
    assert code == 2 and "2-process torchrun run" in line and "--restart" in line
    assert tree(root.path) == before
    code, err = sniff(config, "--restart")
    assert code == 0 and not root.ranks_dir.exists()


# --------------------------------------------------------------------------- 4. push only what is complete


def test_push_refuses_a_half_published_root_and_files_that_changed(tiny_config, tmp_path) -> None:
    hub = {"hf_repo_id": "someone/sniffed", "hf_branch": "tiny"}
    config = tiny_config(capture=ALL_SEED_0)
    assert sniff(config)[0] == 0
    root = LocalDataRoot(tmp_path / "out")
    record = root.read_record()
    pushed = tiny_config(capture=ALL_SEED_0, output={**hub, "data_root": str(root.path)})

    def push() -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            return main(["push", "--config", str(pushed)]), err.getvalue()

    root.write_record(dataclasses.replace(record, state="publishing"))
    code, err = push()
    assert code == 2 and "half-way through publishing" in error_line(err) and "qkcore sniff --config" in err
    root.write_record(record)
    victim = root.path / published(root.path)[0] / "data.parquet"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    code, err = push()
    assert code == 2 and "do not match the record" in error_line(err) and "nothing was pushed" in err
    (root.path / "README.md").unlink()
    code, err = push()
    assert code == 2 and "README.md is missing" in error_line(err)


# --------------------------------------------------------------------------- 11. interrupted, disk full


def test_a_full_disk_is_one_line_and_the_same_command_resumes(tiny_config, tmp_path, monkeypatch) -> None:
    import errno

    config = tiny_config(capture=ALL_SEED_0, output={"commit_every_s": 0})

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.staging_dir / "part-000000.arrow"))

    monkeypatch.setattr(DatasetWriter, "_spill", full)
    code, err = sniff(config)
    line = error_line(err)
    assert code == 2 and "No space left on device" in line and "part-000000.arrow" in line and "resumes" in line
    monkeypatch.undo()
    assert sniff(config)[0] == 0


def test_threads_never_leave_a_run_waiting(tiny_config, tmp_path) -> None:
    """A run ends with no qkcore thread left behind (prefetch and writer threads are joined)."""
    before = {t.name for t in threading.enumerate()}
    assert sniff(tiny_config())[0] == 0
    assert not {t.name for t in threading.enumerate() if t.name.startswith("qkcore")} - before


# --------------------------------------------------------------------------- 12. damaged roots have a way out


def _interrupt_after(monkeypatch, batches: int) -> None:
    """Make the capture stop (as Ctrl-C would) after ``batches`` batches."""
    from qkcore.stages.capture import Sniffer

    real, seen = Sniffer.capture_batch, []

    def interrupted(self, batch, selections=None):
        if len(seen) == batches:
            raise KeyboardInterrupt
        seen.append(1)
        return real(self, batch, selections)

    monkeypatch.setattr(Sniffer, "capture_batch", interrupted)


def test_an_unreadable_record_is_refused_and_replace_takes_the_root_over(tiny_config, tmp_path, monkeypatch) -> None:
    corpus = write_corpus(tmp_path / "long.jsonl", [(f"d{i}", f"text {i} " * (5 + i)) for i in range(8)])
    config = tiny_config(dataset={"path": str(corpus)}, capture=ALL_SEED_0, output={"commit_every_s": 0})
    root = LocalDataRoot(tmp_path / "out")
    assert sniff(config)[0] == 0
    expected = {n: (root.path / n / "data.parquet").read_bytes() for n in published(root.path)}
    (root.state_dir / "run.json").write_text("{not json", encoding="utf-8")
    before = tree(root.path)
    code, err = sniff(config, "--restart")
    line = error_line(err)
    assert code == 2 and "run.json is unreadable" in line and "--replace" in line
    assert tree(root.path) == before
    # --replace takes the root over, but publishes only when the new run has finished
    _interrupt_after(monkeypatch, 2)
    assert sniff(config, "--replace")[0] == 130
    monkeypatch.undo()
    assert (root.state_dir / "run.json").read_text(encoding="utf-8") == "{not json"
    assert {n: (root.path / n / "data.parquet").read_bytes() for n in published(root.path)} == expected
    code, err = sniff(config)  # the same run resumes (its --replace was recorded with its progress)
    assert code == 0 and "resuming" in err, err[-3000:]
    record = root.read_record()
    assert record.state == "complete" and root.verify(record) == []
    assert {n: (root.path / n / "data.parquet").read_bytes() for n in published(root.path)} == expected


def test_restart_discards_staging_whose_journal_is_unreadable(tiny_config, tmp_path) -> None:
    config = tiny_config(capture=ALL_SEED_0)
    root = LocalDataRoot(tmp_path / "out")
    root.staging_dir.mkdir(parents=True)
    (root.staging_dir / JOURNAL_FILE).write_text("[1, 2", encoding="utf-8")
    code, err = sniff(config)
    assert code == 2 and "journal.json is unreadable" in error_line(err) and "--restart" in err
    code, err = sniff(config, "--restart")
    assert code == 0, err[-3000:]
    assert not root.staging_dir.exists() and root.verify(root.read_record()) == []


def _change_in_place_keeping_size_and_mtime(path: Path) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the file: bit rot
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


@pytest.mark.parametrize("damage", ["changed-keeping-size-and-mtime", "deleted"])
def test_a_complete_root_whose_files_changed_is_refused_and_replace_recaptures(tiny_config, tmp_path, damage) -> None:
    config = tiny_config(capture=ALL_SEED_0)
    root = LocalDataRoot(tmp_path / "out")
    assert sniff(config)[0] == 0
    expected = {n: (root.path / n / "data.parquet").read_bytes() for n in published(root.path)}
    victim = published(root.path)[1]
    if damage == "deleted":
        (root.path / victim / "data.parquet").unlink()
    else:
        _change_in_place_keeping_size_and_mtime(root.path / victim / "data.parquet")
    before = tree(root.path)
    code, err = sniff(config)
    line = error_line(err)
    assert code == 2 and "already complete" not in err and "capture planned" not in err
    assert f"{victim}/data.parquet" in line and "--replace" in line
    assert tree(root.path) == before
    # qkcore push agrees on what changed
    pushed = tiny_config(capture=ALL_SEED_0, output={"hf_repo_id": "someone/sniffed", "hf_branch": "tiny"})
    err_io = io.StringIO()
    with contextlib.redirect_stderr(err_io):
        assert main(["push", "--config", str(pushed)]) == 2
    assert f"{victim}/data.parquet" in error_line(err_io.getvalue())
    config = tiny_config(capture=ALL_SEED_0)
    code, err = sniff(config, "--replace")
    assert code == 0, err[-3000:]
    assert {n: (root.path / n / "data.parquet").read_bytes() for n in published(root.path)} == expected
    assert root.verify(root.read_record()) == []


def _interrupted_run(tiny_config, tmp_path, monkeypatch, batches: int) -> tuple[Path, dict]:
    """A run stopped after ``batches`` batches, one commit (and one spill part) per batch; its config and sections."""
    corpus = write_corpus(tmp_path / "long.jsonl", [(f"d{i}", f"text {i} " * (5 + i)) for i in range(12)])
    sections = dict(dataset={"path": str(corpus)}, capture=ALL_SEED_0)
    config = tiny_config(**sections, output={"data_root": str(tmp_path / "out"), "commit_every_s": 0})
    _interrupt_after(monkeypatch, batches)
    assert sniff(config)[0] == 130
    monkeypatch.undo()
    return config, sections


def test_a_damaged_spill_part_resumes_from_the_last_commit_whose_parts_are_intact(tiny_config, tmp_path, monkeypatch) -> None:
    config, sections = _interrupted_run(tiny_config, tmp_path, monkeypatch, batches=4)
    staging = LocalDataRoot(tmp_path / "out").staging_dir
    parts = json.loads((staging / JOURNAL_FILE).read_text())["parts"]
    assert len(parts) >= 2  # one part per commit; the commit of the last batch may not have landed
    last = staging / parts[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut short by a crash of the disk
    code, err = sniff(config)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    damaged = [line for line in err.splitlines() if " is damaged (" in line]
    assert len(damaged) == 1 and parts[-1] in damaged[0], err[-3000:]
    resumed = {n: (tmp_path / "out" / n / "data.parquet").read_bytes() for n in published(tmp_path / "out")}
    assert sniff(tiny_config(**sections, output={"data_root": str(tmp_path / "ref")}))[0] == 0
    assert resumed == {n: (tmp_path / "ref" / n / "data.parquet").read_bytes() for n in published(tmp_path / "ref")}


def test_a_damaged_part_of_a_journal_without_checksums_names_restart(tiny_config, tmp_path, monkeypatch) -> None:
    config, _ = _interrupted_run(tiny_config, tmp_path, monkeypatch, batches=2)
    staging = LocalDataRoot(tmp_path / "out").staging_dir
    journal = json.loads((staging / JOURNAL_FILE).read_text())
    older = {key: journal[key] for key in ("format", "run_key", "parts", "next_part", "configs", "state")}
    (staging / JOURNAL_FILE).write_text(json.dumps(older))  # as the code before part checksums wrote it
    first = staging / journal["parts"][0]
    first.write_bytes(first.read_bytes()[:100])
    before = tree(tmp_path / "out")
    code, err = sniff(config)
    line = error_line(err)
    assert code == 2 and journal["parts"][0] in line and "damaged" in line and "--restart" in line
    assert tree(tmp_path / "out") == before
    assert sniff(config, "--restart")[0] == 0
