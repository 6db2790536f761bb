"""Shared offline fixtures: tiny architecture configs, a small corpus, config writing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# The CI machine is shared and noisy: a 200 ms deadline once failed at 377 ms under load.
# No per-example deadline for the whole suite (tests that set their own keep it).
settings.register_profile("qkcore", deadline=None)
settings.load_profile("qkcore")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# After the offline switches: importing the kit imports transformers and huggingface_hub.
# The kit is also this suite's pytest plugin (its fixtures: qk_eager_reference, qk_sniff, ...).
from qkcore.testing import TEXTS, TINY_LLAMA, write_corpus, write_run_config  # noqa: E402,F401 (shared by the tests)

pytest_plugins = ["qkcore.testing"]

REPO = Path(__file__).resolve().parents[1]


def make_config(tmp_path: Path, architecture: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
    """Write a run config into ``tmp_path`` and return its path; ``sections`` update the defaults."""
    return write_run_config(tmp_path, architecture or TINY_LLAMA, **sections)


def sniff(config: Path, *args: str) -> tuple[int, str]:
    """``qkcore sniff --config CONFIG ARGS`` in this process: (exit status, stderr)."""
    import contextlib
    import io

    from qkcore.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["sniff", "--config", str(config), *args])
    return code, err.getvalue()


def error_line(stderr: str) -> str:
    """The one ``qkcore: error:`` line (asserting there is exactly one and no traceback)."""
    lines = [line for line in stderr.splitlines() if line.startswith("qkcore: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Factory: ``tiny_config(**sections)`` -> path of a config for a tiny random Llama."""

    def factory(architecture: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
        return make_config(tmp_path, architecture, **sections)

    return factory


@dataclass
class S3Root:
    """What the ``s3_root`` fixture gives: the data root URL, its bucket, the server, and the secret in the environment."""

    url: str
    bucket: str
    server: Any  # tests.s3_server.S3Server
    secret: str
    work_dir: Path

    def objects(self) -> dict[str, bytes]:
        """Every object in the bucket: key -> bytes."""
        return self.server.objects(self.bucket)


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server (``.venv/bin/moto_server``) on a free port of 127.0.0.1 for the session; stopped at the end."""
    import uuid

    from tests.s3_server import S3Server

    server = S3Server(secret=f"qkcore-secret-{uuid.uuid4().hex}").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_root(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3Root:
    """A fresh bucket on the session's S3 server and ``s3://BUCKET/root`` as a data root.

    Sets the standard environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (a unique
    string, ``S3Root.secret``: search outputs for it), ``AWS_ENDPOINT_URL``), a short store
    timeout, and ``QKCORE_WORK_DIR`` under ``tmp_path``; subprocesses inherit them.
    """
    import uuid

    bucket = f"qk-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("QKCORE_STORE_TIMEOUT_S", "3")
    monkeypatch.setenv("QKCORE_WORK_DIR", str(tmp_path / "work"))
    return S3Root(f"s3://{bucket}/root", bucket, s3_server, s3_server.secret, tmp_path / "work")
