"""Data roots on object storage (issue 20 §3-4), against a real S3-compatible server (moto's, ``tests/s3_server.py``).

Runs go through the CLI (``qkcore.cli.main``, or ``python -m qkcore`` where the output of
a whole process is searched) and what is checked is what a user sees: the exit status, one
``qkcore: error:`` line, and every object in the bucket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import qkcore.output.remote as remote
from qkcore.cli import main
from qkcore.config import load_config
from qkcore.output import LocalDataRoot, RemoteDataRoot
from qkcore.output.lease import LEASE_FILE, Holder, Lease
from qkcore.output.store import Conditional
from qkcore.sniff import run_sniff
from tests.conftest import S3Root, error_line, make_config, sniff
from tests.hub_server import HubServer, hub_server  # noqa: F401 (fixture)
from tests.s3_server import S3Server

# Every test here starts or uses moto's server, a subprocess (the unit tests of tests/unit/test_remote_root.py
# cover the same backend on fsspec's memory:// without one).
pytestmark = pytest.mark.slow

ALL_SEED_0 = {"sampler": {"type": "all"}, "head_sampling": {"count": 6, "seed": 0}}
UNIFORM_SEED_7 = {"sampler": {"type": "uniform", "base_rate": 4}, "head_sampling": {"count": 6, "seed": 7}}


class _Frozen(datetime):
    """A clock stopped at one instant: the card's ``created`` is the same for two runs compared byte for byte."""

    @classmethod
    def now(cls, tz=None):  # noqa: ANN001, ANN206
        return datetime(2026, 1, 2, 3, 4, 5, tzinfo=tz)


@pytest.fixture
def frozen_clock(monkeypatch) -> None:
    import qkcore.stages.finish

    monkeypatch.setattr(qkcore.stages.finish, "datetime", _Frozen)


def config(folder: Path, data_root: str, output: dict | None = None, **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return make_config(folder, output={"data_root": data_root, **(output or {})}, **sections)


def local_files(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in LocalDataRoot(root).dataset_files()}


def published(s3: S3Root, run_key: str) -> dict[str, bytes]:
    """The objects under ``root/runs/RUN_KEY/`` by repo path."""
    prefix = f"root/runs/{run_key}/"
    return {key[len(prefix):]: data for key, data in s3.objects().items() if key.startswith(prefix)}


def without_lease(objects: dict[str, bytes]) -> dict[str, bytes]:
    return {key: data for key, data in objects.items() if not key.endswith(LEASE_FILE)}


def test_sniff_to_s3_is_byte_identical_to_a_local_root_and_reads_back(s3_root: S3Root, tmp_path, monkeypatch,
                                                                      frozen_clock) -> None:
    local = tmp_path / "local-root"
    assert sniff(config(tmp_path / "a", str(local), capture=ALL_SEED_0))[0] == 0
    code, err = sniff(config(tmp_path / "b", s3_root.url, capture=ALL_SEED_0))
    assert code == 0, err
    record = RemoteDataRoot(s3_root.url).read_record()
    assert record is not None and record.state == "complete"
    assert record.run_key == LocalDataRoot(local).read_record().run_key
    files = local_files(local)
    assert published(s3_root, record.run_key) == files  # data files, manifest and card, byte for byte
    assert {name: (e.size, e.sha256) for name, e in record.files.items()} == {
        name: (e.size, e.sha256) for name, e in LocalDataRoot(local).read_record().files.items()}
    assert set(s3_root.objects()) == {"root/.qkcore/run.json", *(f"root/runs/{record.run_key}/{n}" for n in files)}

    # A no-op rerun: "already complete" from the listing's ETags, without downloading a byte.
    before = s3_root.objects()

    def no_download(self, path, size):
        raise AssertionError(f"downloaded {path}")

    with monkeypatch.context() as patch:
        patch.setattr(remote.RemoteDataRoot, "_sha256", no_download)
        code, err = sniff(config(tmp_path / "b", s3_root.url, capture=ALL_SEED_0))
    assert code == 0 and "already complete" in err, err
    assert s3_root.objects() == before

    # An object rewritten on the store (same size) is found: its ETag changed, so it is downloaded and hashed.
    name = next(n for n in files if n.endswith(".parquet"))
    key = f"root/runs/{record.run_key}/{name}"
    damaged = bytearray(before[key])
    damaged[len(damaged) // 2] ^= 0xFF
    s3_root.server.client().put_object(Bucket=s3_root.bucket, Key=key, Body=bytes(damaged))
    code, err = sniff(config(tmp_path / "b", s3_root.url, capture=ALL_SEED_0))
    assert code == 2 and f"{name} changed" in error_line(err)
    s3_root.server.client().put_object(Bucket=s3_root.bucket, Key=key, Body=before[key])

    # Reading it back: inspect, plasticity (outputs in a local folder), load_dataset as the README shows.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", s3_root.url, "--out", str(tmp_path / "inspect.png")]) == 0
    assert f"qkcore inspect: {s3_root.url}" in out.getvalue() and (tmp_path / "inspect.png").is_file()
    plasticity = {}
    for label, root in (("local", str(local)), ("s3", s3_root.url)):
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["plasticity", root, "--out", str(tmp_path / f"p-{label}"), "--workers", "1",
                         "--no-progress"]) == 0
        plasticity[label] = [(tmp_path / f"p-{label}" / name).read_bytes()
                             for name in ("head_bucket_plasticity.csv", "head_metrics.csv")]
    assert plasticity["s3"] == plasticity["local"]

    import datasets.config
    from datasets import load_dataset

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # the suite's offline switch blocks s3:// too
    record_key = RemoteDataRoot(s3_root.url).read_record().run_key
    first = sorted(n for n in files if n.endswith("q/data.parquet"))[0]
    ds = load_dataset("parquet", data_files=f"{s3_root.url}/runs/{record_key}/{first}",
                      storage_options={"endpoint_url": s3_root.server.endpoint}, split="train",
                      cache_dir=str(tmp_path / "hf-cache"))
    table = pq.read_table(local / first)
    assert ds.num_rows == table.num_rows and ds["position"] == table.column("position").to_pylist()


def test_replace_and_a_killed_publish_keep_the_earlier_run(s3_root: S3Root, tmp_path, monkeypatch) -> None:
    first = config(tmp_path / "a", s3_root.url, capture=ALL_SEED_0)
    assert sniff(first)[0] == 0
    run_a = RemoteDataRoot(s3_root.url).read_record()
    before = s3_root.objects()

    other = config(tmp_path / "b", s3_root.url, capture=UNIFORM_SEED_7)
    code, err = sniff(other)
    assert code == 2 and f"holds run {run_a.run_key}" in error_line(err) and "--replace" in error_line(err)
    assert s3_root.objects() == before

    # --replace, killed after its files are uploaded and before its record: run A is untouched and still the run.
    original = remote.RemoteDataRoot.write_record

    def killed(self, record):
        if record.run_key != run_a.run_key:
            raise KeyboardInterrupt
        original(self, record)

    with monkeypatch.context() as patch:
        patch.setattr(remote.RemoteDataRoot, "write_record", killed)
        assert sniff(other, "--replace")[0] == 130
    after = s3_root.objects()
    assert {key: after.get(key) for key in before} == before  # not a byte of run A changed
    assert any(key.startswith("root/runs/") and run_a.run_key not in key for key in after)  # B's unrecorded upload
    root = RemoteDataRoot(s3_root.url)
    assert root.read_record() == run_a and root.verify(run_a) == []
    assert root.dataset_files() == sorted(run_a.files)  # readers trust only what the record lists

    # The same command again finishes B (from the local final folder); A's files go only now.
    code, err = sniff(other, "--replace")
    assert code == 0, err
    run_b = RemoteDataRoot(s3_root.url).read_record()
    assert run_b.run_key != run_a.run_key and RemoteDataRoot(s3_root.url).verify(run_b) == []
    assert set(s3_root.objects()) == {"root/.qkcore/run.json", *(f"root/runs/{run_b.run_key}/{n}" for n in run_b.files)}


def test_a_held_lease_refuses_a_second_sniff_and_an_expired_one_is_taken_over(s3_root: S3Root, tmp_path,
                                                                              monkeypatch) -> None:
    cfg = config(tmp_path / "a", s3_root.url, capture=ALL_SEED_0)
    root = RemoteDataRoot(s3_root.url)
    lease_path = root._state(LEASE_FILE)
    holder = Lease(Conditional(root.fs), lease_path, s3_root.url)
    holder.acquire("qkcore sniff --config other.yaml")
    try:
        code, err = sniff(cfg)
        line = error_line(err)
        assert code == 2
        assert f"{s3_root.url} is in use by process {os.getpid()} on {socket.gethostname()}" in line
        assert "qkcore sniff --config other.yaml" in line and "expires at" in line
        assert set(s3_root.objects()) == {"root/.qkcore/lease.json"}  # nothing else was written
    finally:
        holder.release()
    assert s3_root.objects() == {}

    # A holder that stopped renewing (a dead machine): refused until the lease expires, then taken over.
    # No sleeping on a short lease (a loaded machine may take longer than it to start a sniff): the
    # lease is long, and its running out is its expiry moved into the past, as the clock would.
    monkeypatch.setenv("QKCORE_LEASE_S", "60")
    dead = Lease(Conditional(root.fs), lease_path, s3_root.url)
    dead.acquire("qkcore sniff --config dead.yaml")
    dead._stop.set()  # its renewal thread stops, as if the machine went away
    dead._thread.join()
    assert sniff(cfg)[0] == 2
    lease = Holder.parse(root.fs.cat_file(lease_path))
    assert lease is not None and lease.token == dead.token
    past = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat(timespec="milliseconds")
    root.fs.pipe_file(lease_path, dataclasses.replace(lease, expires=past).to_bytes())
    code, err = sniff(cfg)
    assert code == 0 and "took over the lease" in err and "expired" in err, err
    with pytest.raises(Exception, match="no longer holds the lease"):
        dead.check()  # the old holder must not publish
    assert RemoteDataRoot(s3_root.url).verify(RemoteDataRoot(s3_root.url).read_record()) == []

    # A lease left by a foreign host's process, expired: taken over as well.
    stale = Holder(12345, "some-other-host", "ann", "qkcore sniff", "2026-01-01T00:00:00+00:00", "t" * 32,
                   (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat())
    root.fs.pipe_file(lease_path, stale.to_bytes())
    code, err = sniff(cfg)
    assert code == 0 and "already complete" in err and "some-other-host" in err, err


def test_a_second_sniff_is_refused_while_a_running_sniff_holds_the_lease(s3_root: S3Root, tmp_path) -> None:
    cfg = config(tmp_path / "a", s3_root.url, capture=ALL_SEED_0)
    first = subprocess.Popen([sys.executable, "-m", "qkcore", "sniff", "--config", str(cfg)], env=dict(os.environ),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        root = RemoteDataRoot(s3_root.url)
        deadline = time.monotonic() + 120
        while not root.fs.exists(root._state(LEASE_FILE)):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lease, mid-run, for as long as the test needs
        try:
            code, err = sniff(config(tmp_path / "b", s3_root.url, capture=ALL_SEED_0))
            line = error_line(err)
            assert code == 2 and f"is in use by process {first.pid} on {socket.gethostname()}" in line, line
            assert f"sniff --config {cfg}" in line and "expires at" in line
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert RemoteDataRoot(s3_root.url).verify(RemoteDataRoot(s3_root.url).read_record()) == []
    assert not any(key.endswith(LEASE_FILE) for key in s3_root.objects())  # released at the end


def test_the_store_going_down_mid_run_is_one_error_and_a_rerun_after_it_is_back_is_identical(tmp_path, monkeypatch,
                                                                                              frozen_clock) -> None:
    server = S3Server(secret="qkcore-down-secret").start()
    try:
        server.create_bucket("down")
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("QKCORE_STORE_TIMEOUT_S", "2")
        monkeypatch.setenv("QKCORE_WORK_DIR", str(tmp_path / "work"))
        url = "s3://down/root"
        cfg = config(tmp_path / "a", url, capture=UNIFORM_SEED_7)
        original = remote.RemoteDataRoot.publish

        def down_then_publish(self, record):
            server.stop()  # the capture is done, staged and finalized locally; the store goes away
            return original(self, record)

        with monkeypatch.context() as patch:
            patch.setattr(remote.RemoteDataRoot, "publish", down_then_publish)
            started = time.monotonic()
            code, err = sniff(cfg)
        line = error_line(err)
        assert code == 2 and f"the store {url} failed while publishing" in line and "rerun the same command" in line
        assert time.monotonic() - started < 60
        code, err = sniff(cfg)  # still down: refused at once
        assert code == 2 and f"the store {url} failed" in error_line(err)

        server.start_again()
        code, err = sniff(cfg)
        assert code == 0, err
        record = RemoteDataRoot(url).read_record()
        local = tmp_path / "clean"
        assert sniff(config(tmp_path / "b", str(local), capture=UNIFORM_SEED_7))[0] == 0
        prefix = f"root/runs/{record.run_key}/"
        assert {k[len(prefix):]: v for k, v in server.objects("down").items() if k.startswith(prefix)} == \
            local_files(local)

        # A store that accepts connections and never answers (the process stopped): an error within seconds too.
        monkeypatch.setenv("QKCORE_STORE_TIMEOUT_S", "1")
        os.kill(server._proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            code, err = sniff(cfg)
            assert code == 2 and f"the store {url} failed" in error_line(err)
            assert time.monotonic() - started < 30
        finally:
            os.kill(server._proc.pid, signal.SIGCONT)
    finally:
        server.close()


def test_a_run_on_s3_pushes_its_files_to_the_hub(s3_root: S3Root, tmp_path, hub_server: HubServer) -> None:
    cfg = config(tmp_path / "a", s3_root.url, capture=UNIFORM_SEED_7,
                 output={"hf_repo_id": "lab/sniffed-qk", "hf_branch": "tiny"})
    result = run_sniff(load_config(cfg))
    assert result.action == "captured"
    record = RemoteDataRoot(s3_root.url).read_record()
    assert record.pushed
    branch = hub_server.files("lab/sniffed-qk", "tiny")
    branch.pop(".gitattributes", None)
    assert branch == published(s3_root, record.run_key)
    assert main(["push", "--config", str(cfg)]) == 0  # `qkcore push` on an s3 root (via its verified copy)


def test_no_secret_reaches_any_output(s3_root: S3Root, tmp_path) -> None:
    """The secret in AWS_SECRET_ACCESS_KEY is in no object, no work file, no stdout or stderr, failing runs included."""
    env = dict(os.environ)
    outputs: list[str] = []

    def qkcore(*args: str) -> int:
        done = subprocess.run([sys.executable, "-m", "qkcore", *args], env=env, capture_output=True, text=True,
                              timeout=300)
        outputs.extend([done.stdout, done.stderr])
        return done.returncode

    assert qkcore("sniff", "--config", str(config(tmp_path / "a", s3_root.url))) == 0
    assert qkcore("sniff", "--config", str(config(tmp_path / "a", s3_root.url))) == 0  # no-op
    assert qkcore("inspect", s3_root.url, "--out", str(tmp_path / "i.png")) == 0
    assert qkcore("sniff", "--config", str(config(tmp_path / "b", "s3://no-such-bucket-qk/root"))) == 2
    line = error_line(outputs[-1])
    assert "the store s3://no-such-bucket-qk/root failed" in line and "bucket does not exist" in line, line
    bad_endpoint = config(tmp_path / "c", s3_root.url)
    assert qkcore("sniff", "--config", str(bad_endpoint), "--set",
                  "output.storage_options={endpoint_url: 'http://127.0.0.1:9'}") == 2
    assert qkcore("sniff", "--config", str(bad_endpoint), "--set",
                  f"output.storage_options={{secret: {s3_root.secret}}}") == 2
    assert "looks like a secret" in outputs[-1]
    env["AWS_ACCESS_KEY_ID"] = "wrong-key"
    assert qkcore("sniff", "--config", str(config(tmp_path / "d", s3_root.url, capture=ALL_SEED_0))) == 2

    secret = s3_root.secret.encode()
    leaks = [text for text in outputs if s3_root.secret in text]
    assert not leaks, leaks
    assert all(secret not in data for data in s3_root.objects().values())
    files = [p for p in tmp_path.rglob("*") if p.is_file()]  # configs, work folders, plots, logs
    assert files and all(secret not in p.read_bytes() for p in files)
