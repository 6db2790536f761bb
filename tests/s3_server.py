"""An S3-compatible server on 127.0.0.1 for the tests: moto's server mode (``.venv/bin/moto_server``) as a subprocess.

:class:`S3Server` starts it on a free port and waits until it answers; :meth:`S3Server.stop`
kills it (clients then get "connection refused", as from a store that went down) after
keeping a copy of every object; :meth:`S3Server.start_again` starts it on the same port and
puts every object back (moto keeps its data in memory: a real store keeps its objects
while it is down, so "start it again" means the same objects at the same address).
:func:`s3_env` is the environment a client needs (dummy credentials, the endpoint).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ACCESS_KEY = "qkcore-test-access"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _moto_server() -> str:
    beside = Path(sys.executable).with_name("moto_server")
    return str(beside) if beside.exists() else (shutil.which("moto_server") or "moto_server")


class S3Server:
    """One moto S3 server process (see the module docstring)."""

    def __init__(self, secret: str = "qkcore-test-secret") -> None:
        self.port = _free_port()
        self.secret = secret
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._kept: dict[str, dict[str, bytes]] = {}

    def env(self) -> dict[str, str]:
        """Environment variables that point boto/s3fs at this server (standard names only)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> S3Server:
        """Start the server and wait (at most 30 s) until it answers."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._proc = subprocess.Popen(
            [_moto_server(), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).close()
                return self
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from None
                time.sleep(0.1)

    def client(self):  # noqa: ANN201 - a boto3 S3 client
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=self.secret)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object of ``bucket``: key -> bytes."""
        client = self.client()
        out: dict[str, bytes] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                out[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        """Keep every object, then kill the server (connections are refused until :meth:`start_again`)."""
        client = self.client()
        self._kept = {b["Name"]: self.objects(b["Name"]) for b in client.list_buckets()["Buckets"]}
        self._kill()

    def start_again(self) -> None:
        """Start on the same port with the objects :meth:`stop` kept."""
        self.start()
        client = self.client()
        for bucket, objects in self._kept.items():
            client.create_bucket(Bucket=bucket)
            for key, data in objects.items():
                client.put_object(Bucket=bucket, Key=key, Body=data)

    def close(self) -> None:
        self._kill()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
