"""The object-storage data root (``output/remote.py``, ``output/lease.py``) on fsspec's ``memory://``, and the config's URLs.

The same code runs against a real S3 server in ``tests/integration/test_s3_root.py``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import fsspec
import pytest

from qkcore.config import ConfigError, OutputConfig, load_config
from qkcore.errors import QkcoreError
from qkcore.output import LocalDataRoot, RemoteDataRoot, open_root
from qkcore.output.store import check_storage_options, url_scheme
from tests.conftest import make_config


@pytest.fixture
def url() -> str:
    return f"memory://qk-unit/{uuid.uuid4().hex}"


def test_data_root_keeps_a_url_whole_and_local_paths_as_before(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert OutputConfig(data_root="s3://bucket/some/prefix/").data_root == "s3://bucket/some/prefix"
    assert OutputConfig(data_root="data/x").data_root == tmp_path / "data" / "x"
    assert OutputConfig().data_root == tmp_path / "data"
    assert OutputConfig(data_root=f"file://{tmp_path}/y").data_root == tmp_path / "y"
    assert [url_scheme(v) for v in ("s3://b/p", "gs://b", "hf://datasets/a/b", "file:///x", "/x", "C:/x")] == \
        ["s3", "gs", "hf", None, None, None]
    assert isinstance(open_root("s3://bucket/p"), RemoteDataRoot)
    assert isinstance(open_root(tmp_path / "z"), LocalDataRoot) and not (tmp_path / "z").exists()


def test_storage_options_refuse_secrets_without_repeating_them(tmp_path) -> None:
    assert check_storage_options({"endpoint_url": "http://x", "region_name": "eu"}) == {
        "endpoint_url": "http://x", "region_name": "eu"}
    secret = f"s-{uuid.uuid4().hex}"
    for key in ("secret", "key", "token", "aws_secret_access_key", "password", "session_token"):
        config = make_config(tmp_path, output={"data_root": "s3://b/p", "storage_options": {key: secret}})
        with pytest.raises(ConfigError, match=f"storage_options.{key} looks like a secret") as error:
            load_config(config)
        assert secret not in str(error.value)
        with pytest.raises(ConfigError) as error:
            load_config(make_config(tmp_path), overrides=[f"output.storage_options={{{key}: {secret}}}"])
        assert secret not in str(error.value) and "looks like a secret" in str(error.value)


def _stage(folder: Path, parts: dict[str, bytes]) -> None:
    """A committed staging folder: parts and a journal recording their sizes and sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in parts.items():
        (folder / name).write_bytes(data)
    sums = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in parts.items()}
    (folder / "journal.json").write_text(json.dumps({"format": 1, "run_key": "k", "parts": sorted(parts),
                                                     "part_sums": sums, "state": {}}))


def test_staged_shards_travel_through_the_store_checked_against_their_journal(url, tmp_path) -> None:
    here = RemoteDataRoot(url, work_dir=tmp_path / "machine-a")
    there = RemoteDataRoot(url, work_dir=tmp_path / "machine-b")
    assert here.staged_ranks() == [] and not there.has_state()
    _stage(here.rank_staging(2), {"part-000000.arrow": b"a" * 10, "part-000001.arrow": b"b" * 7})
    here.save_staged(2)
    assert there.staged_ranks() == [2] and there.has_state()
    there.load_staged(2)
    copied = {p.name: p.read_bytes() for p in there.rank_staging(2).iterdir()}
    assert copied == {p.name: p.read_bytes() for p in here.rank_staging(2).iterdir()}

    # A later commit: one part more; only it and the journal are uploaded, and the other machine catches up.
    _stage(here.rank_staging(2), {"part-000000.arrow": b"a" * 10, "part-000001.arrow": b"b" * 7,
                                  "part-000002.arrow": b"c" * 3})
    here.save_staged(2)
    there.load_staged(2)
    assert (there.rank_staging(2) / "part-000002.arrow").read_bytes() == b"c" * 3

    # A resume from an earlier commit reuses a part's name for other rows of the same size: uploaded again.
    _stage(here.rank_staging(2), {"part-000000.arrow": b"a" * 10, "part-000001.arrow": b"b" * 7,
                                  "part-000002.arrow": b"d" * 3})
    here.save_staged(2)
    there.load_staged(2)
    assert (there.rank_staging(2) / "part-000002.arrow").read_bytes() == b"d" * 3

    # A part damaged on the store: refused, naming the way out; nothing half-downloaded stays.
    fs = fsspec.filesystem("memory")
    remote_part = f"{url.removeprefix('memory://')}/.qkcore/ranks/rank-002/part-000001.arrow"
    fs.pipe_file(remote_part, b"B" * 7)
    fresh = RemoteDataRoot(url, work_dir=tmp_path / "machine-c")
    with pytest.raises(QkcoreError, match="part-000001.arrow does not match its journal.*--restart"):
        fresh.load_staged(2)
    assert not (fresh.rank_staging(2) / "journal.json").exists()

    here.discard_work()
    assert there.staged_ranks() == [2]  # machine b's own copy is still there
    there.discard_work()
    assert there.staged_ranks() == [] and not here.rank_staging(2).exists()


def test_the_lease_refuses_a_second_holder_and_checks_a_held_token(url, tmp_path) -> None:
    root = RemoteDataRoot(url, work_dir=tmp_path / "w")
    other = RemoteDataRoot(url, work_dir=tmp_path / "w2")
    with root.locked("qkcore sniff --config a.yaml") as token:
        with pytest.raises(QkcoreError, match=rf"{url} is in use by process \d+ on .*qkcore sniff --config a.yaml.*"
                                              "expires at"):
            with other.locked("qkcore sniff --config b.yaml"):
                pass
        with other.locked("task", held=token) as same:
            assert same == token
        with pytest.raises(QkcoreError, match="not by the sweep that started this task"):
            with other.locked("task", held="0" * 32):
                pass
    with pytest.raises(QkcoreError, match="no longer held by the sweep"):
        with other.locked("task", held=token):
            pass
    with other.locked("qkcore sniff --config b.yaml"):  # released: free again
        pass


def test_an_unreadable_record_names_the_url_and_every_run_s_files_count(url, tmp_path) -> None:
    from qkcore.output import UnreadableRecord

    fs = fsspec.filesystem("memory")
    path = url.removeprefix("memory://")
    fs.pipe_file(f"{path}/.qkcore/run.json", b"{not json")
    fs.pipe_file(f"{path}/runs/aaaa/README.md", b"card")
    fs.pipe_file(f"{path}/runs/aaaa/l00h00q/data.parquet", b"rows")
    fs.pipe_file(f"{path}/runs/aaaa/notes.txt", b"not a dataset file")
    root = RemoteDataRoot(url, work_dir=tmp_path / "w")
    with pytest.raises(UnreadableRecord, match=rf"{url}/.qkcore/run.json is unreadable.*--replace"):
        root.read_record()
    assert root.dataset_files() == ["README.md", "l00h00q/data.parquet"]
    fs.rm_file(f"{path}/.qkcore/run.json")
    assert root.read_record() is None and root.dataset_files() == []  # unrecorded leftovers are not the root's run


def test_a_task_under_a_sweep_s_lease_publishes_only_while_the_sweep_holds_it(url, tmp_path) -> None:
    from qkcore.output import Record
    from qkcore.run_state import PublishedFile, RunIdentity

    sweep = RemoteDataRoot(url, work_dir=tmp_path / "driver")
    task = RemoteDataRoot(url, work_dir=tmp_path / "worker")
    (task.final_dir / "l00h00q").mkdir(parents=True)
    (task.final_dir / "l00h00q" / "data.parquet").write_bytes(b"rows")
    record = Record("publishing", RunIdentity("k" * 16, {}),
                    {"l00h00q/data.parquet": PublishedFile(4, hashlib.sha256(b"rows").hexdigest())})
    fs = fsspec.filesystem("memory")
    lease = f"{url.removeprefix('memory://')}/.qkcore/lease.json"
    with sweep.locked("qkcore sweep") as token, task.locked("task", held=token):
        held = fs.cat_file(lease)
        fs.pipe_file(lease, held.replace(token.encode(), b"f" * 32))  # someone else's lease now
        with pytest.raises(QkcoreError, match="not by the sweep that started this task"):
            task.publish(record)
        assert task.read_record() is None  # nothing was published
        fs.pipe_file(lease, held)
        assert task.publish(record).state == "complete"
    assert task.verify(task.read_record()) == []


def test_a_store_error_is_one_line_naming_the_url_and_never_the_secret(monkeypatch) -> None:
    from qkcore.output.store import answering

    secret = f"s-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(QkcoreError) as error:
        with answering("s3://bucket/root", "writing its record"):
            raise OSError(f"signature mismatch for {secret}\nsecond line")
    message = str(error.value)
    assert "\n" not in message and secret not in message and "***" in message
    assert message.startswith("output.data_root: the store s3://bucket/root failed while writing its record (OSError")
    assert "rerun the same command" in message


def test_plan_takes_a_config_whose_data_root_is_a_url_without_touching_the_store(tmp_path, capsys) -> None:
    from qkcore.cli import main

    config = make_config(tmp_path, output={"data_root": "s3://no-such-bucket-qk/root"})
    assert main(["plan", "--config", str(config)]) == 0
    assert "expected rows" in capsys.readouterr().out.lower()
