"""``qkcore sweep`` with its data roots on object storage (issue 20 §4): a local Ray and moto's S3 server.

Ray's workers take the environment of the process that starts Ray, so this module sets the
store's environment (endpoint, credentials with a unique secret, a short store timeout, the
work folder) first and then starts its own Ray; both stop when the module ends.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from qkcore.config import load_config
from qkcore.output import open_root
from qkcore.output.lease import LEASE_FILE
from qkcore.sniff import run_sniff
from tests.sweep_runs import published, published_files, sweep_cli, sweep_config

pytestmark = pytest.mark.slow


class Store:
    """The module's bucket: its URL prefix, the server, the secret in the environment, the work folder."""

    def __init__(self, server: Any, bucket: str, work: Path) -> None:
        self.server, self.bucket, self.work = server, bucket, work

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def objects(self, name: str) -> dict[str, bytes]:
        """The objects under data root ``name`` (key below the root → bytes)."""
        prefix = f"{name}/"
        return {key[len(prefix):]: data for key, data in self.server.objects(self.bucket).items() if key.startswith(prefix)}

    def run_files(self, name: str) -> dict[str, bytes]:
        """The published files of the run data root ``name``'s record names (repo path → bytes)."""
        key = open_root(self.url(name)).read_record().run_key
        prefix = f"runs/{key}/"
        return {path[len(prefix):]: data for path, data in self.objects(name).items() if path.startswith(prefix)}


@pytest.fixture(scope="module")
def store(s3_server, tmp_path_factory) -> Iterator[Store]:
    """A bucket, the store's environment, then a local Ray of 2 CPUs whose workers inherit it."""
    ray = pytest.importorskip("ray")
    bucket = f"qk-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    work = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as env:
        for name, value in s3_server.env().items():
            env.setenv(name, value)
        env.setenv("QKCORE_STORE_TIMEOUT_S", "3")
        env.setenv("QKCORE_WORK_DIR", str(work))
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            yield Store(s3_server, bucket, work)
        finally:
            ray.shutdown()


def test_three_shards_over_s3_publish_byte_identical_files_to_one_process_on_a_local_root(store, tmp_path) -> None:
    sections = dict(inference={"batch_size": 3}, capture={"sampler": {"type": "uniform", "base_rate": 4}})
    run_sniff(load_config(sweep_config(tmp_path / "local", documents=11, **sections)))
    config = sweep_config(tmp_path / "s3", documents=11, output={"data_root": store.url("sharded")}, **sections)
    code, out = sweep_cli("--shards", "3", str(config))
    assert code == 0, out
    assert published_files(store.run_files("sharded")) == published(tmp_path / "local" / "out")
    assert not any(key.startswith(".qkcore/ranks/") for key in store.objects("sharded"))  # merged, then discarded
    assert not any(key == f".qkcore/{LEASE_FILE}" for key in store.objects("sharded"))  # released at the end

    code, again = sweep_cli("--shards", "3", str(config))  # complete: nothing to do
    assert code == 0 and "already complete" in again, again

    secret = store.server.secret.encode()
    leaks = [key for key, data in store.objects("sharded").items() if secret in data]
    leaks += [str(p) for p in store.work.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaks and secret.decode() not in out + again, leaks


def test_a_second_sweep_on_an_s3_root_a_sweep_holds_is_refused_by_the_lease_naming_the_holder(store, tmp_path) -> None:
    from qkcore.sweep.driver import SweepOptions, run_sweep

    first = sweep_config(tmp_path / "first", documents=60, inference={"batch_size": 1},
                         output={"data_root": store.url("shared")})
    second = sweep_config(tmp_path / "second", documents=3, output={"data_root": store.url("shared")})
    lines: list[str] = []
    reports: list[Any] = []
    sweep = threading.Thread(target=lambda: reports.extend(run_sweep([str(first)], SweepOptions(), echo=lines.append)))
    sweep.start()
    deadline = time.monotonic() + 120
    while not any("capturing" in text for text in lines):  # the first sweep holds the lease and its run started
        assert sweep.is_alive() and time.monotonic() < deadline, lines
        time.sleep(0.2)

    code, out = sweep_cli(str(second))
    sweep.join(timeout=300)
    assert code == 2, out
    assert f"{second}: failed: " in out and "in use by process" in out and "its lease expires at" in out, out
    assert f"process {os.getpid()} on " in out  # the first sweep's driver: this process
    assert [r.status for r in reports] == ["done"], lines
    assert published_files(store.run_files("shared"))  # the first sweep's run, published
