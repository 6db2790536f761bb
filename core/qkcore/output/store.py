"""An fsspec filesystem for a data root URL: bounded retries, conditional writes, one error line when it fails.

Credentials are never passed here: each backend reads its standard places (``AWS_*``
environment variables and ``~/.aws``, fsspec's ``FSSPEC_S3_*`` configuration, gcloud's
application default credentials, ``HF_TOKEN``). ``output.storage_options`` may add
non-secret options (an endpoint, a region); secret-looking keys are refused when the
config loads (:func:`check_storage_options`).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from qkcore.errors import QkcoreError

#: A data root with a scheme (``s3://``, ``gs://``, ``hf://``, ``memory://``) is on a store; ``file://`` is local.
_URL_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: Keys of ``output.storage_options`` that would put a secret in a config (and so in the card).
_SECRET_RE = re.compile(r"(secret|password|token|passwd|credential|private|^key$|access_key|session)", re.IGNORECASE)
#: Environment variables whose values are secrets: scrubbed from every message, whatever the library says.
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "FSSPEC_S3_SECRET", "FSSPEC_S3_TOKEN")


def url_scheme(value: str) -> str | None:
    """The scheme of a data root URL (``s3``), ``None`` for a local path (``file://`` counts as local)."""
    match = _URL_RE.match(value)
    if match is None or match.group(1).lower() == "file":
        return None
    return match.group(1).lower()


def check_storage_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``output.storage_options`` unless a key looks like a secret (one line naming it and the way out)."""
    for key in options:
        if _SECRET_RE.search(str(key)):
            raise ValueError(
                f"output.storage_options.{key} looks like a secret; configs are shared and logged, so "
                "credentials come from the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, "
                "GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN), never from the config"
            )
    return dict(options)


def timeout_s() -> float:
    """Seconds a store connection may take (``QKCORE_STORE_TIMEOUT_S``, default 10); a response may take 3x that."""
    try:
        return max(0.5, float(os.environ.get("QKCORE_STORE_TIMEOUT_S", "10")))
    except ValueError:
        return 10.0


def open_store(url: str, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the root's path on it, with retries bounded (seconds, not minutes)."""
    import fsspec

    kwargs: dict[str, Any] = dict(options or {})
    scheme = url_scheme(url)
    if scheme in ("s3", "s3a"):
        timeout = timeout_s()
        config = dict(kwargs.pop("config_kwargs", {}) or {})
        config.setdefault("connect_timeout", timeout)
        config.setdefault("read_timeout", 3 * timeout)
        config.setdefault("retries", {"max_attempts": 2, "mode": "standard"})
        kwargs["config_kwargs"] = config
        kwargs.setdefault("skip_instance_cache", True)  # credentials and endpoint read afresh
    try:
        fs, path = fsspec.core.url_to_fs(url, **kwargs)
    except ImportError as exc:
        raise QkcoreError(
            f"output.data_root: {url} needs a filesystem that is not installed ({exc}); "
            f"pip install 'qkcore[s3]' (s3fs), gcsfs for gs://, huggingface_hub for hf://"
        ) from None
    except (ValueError, TypeError) as exc:
        raise QkcoreError(f"output.data_root: {url} cannot be opened: {scrub(str(exc))}") from None
    if scheme in ("s3", "s3a"):
        # s3fs retries timeouts 5 times on top of botocore's attempts: a hung store would take many minutes
        fs.retries = 1
    if getattr(fs, "async_impl", False):
        fs = Deadlines(fs, timeout_s())
    return fs, path.rstrip("/")


#: Transfer rate below which an upload or download counts as hung (bytes per second).
_SLOWEST_TRANSFER = 1 << 20


class Deadlines:
    """An async fsspec filesystem whose every call has a deadline (fsspec's ``sync(timeout=...)``).

    The client's own timeouts do not bound every path (a server that accepts connections
    and never answers held a call for minutes in tests), so each call gets one: requests
    ``6 x QKCORE_STORE_TIMEOUT_S``, transfers that plus one second per MiB.
    """

    _TIMED = frozenset({"pipe_file", "cat_file", "find", "info", "exists", "ls", "rm", "rm_file", "call_s3"})

    def __init__(self, fs: Any, timeout: float) -> None:
        self.raw = fs
        self._deadline = 6 * timeout

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.raw, name)
        if name in self._TIMED:
            return lambda *args, **kwargs: attr(*args, timeout=self._deadline, **kwargs)
        return attr

    def put_file(self, lpath: str, rpath: str) -> None:
        size = os.path.getsize(lpath)
        self.raw.put_file(lpath, rpath, timeout=self._deadline + size / _SLOWEST_TRANSFER)

    def get_file(self, rpath: str, lpath: str, size: int | None = None) -> None:
        if size is None:
            size = int(self.info(rpath)["size"])
        self.raw.get_file(rpath, lpath, timeout=self._deadline + size / _SLOWEST_TRANSFER)


def scrub(text: str) -> str:
    """``text`` with the values of secret environment variables replaced by ``***``."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def cause(exc: BaseException) -> str:
    """A short, secret-free phrase for what a store call raised."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 200:
        text = text[:197] + "..."
    return scrub(f"{type(exc).__name__}: {text}")


@contextmanager
def answering(url: str, doing: str) -> Iterator[None]:
    """Turn whatever the store raises while ``doing`` into one line naming ``url`` and the way out."""
    try:
        yield
    except QkcoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, OSError: one line for all of them
        raise QkcoreError(store_error(url, doing, exc)) from None


def store_error(url: str, doing: str, exc: BaseException) -> str:
    """The one line of a store that failed: what, why, and what to do."""
    return (
        f"output.data_root: the store {url} failed while {doing} ({cause(exc)}); check that it is up and that the "
        "bucket, endpoint and credentials (environment) are right, then rerun the same command: the run resumes "
        "from its last commit"
    )


class Conflict(Exception):
    """A conditional write lost: the object is not in the state the writer expected."""


class Conditional:
    """Create-if-absent and replace-if-unchanged on one object, with the store's own conditions where it has them.

    S3 (and S3-compatible servers that implement them, such as moto's): ``If-None-Match: *``
    and ``If-Match: ETAG`` on PutObject, atomic. Other filesystems: read, compare, write:
    not atomic (two processes starting in the same instant may both win); the README
    says so.
    """

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        self.atomic = type(getattr(fs, "raw", fs)).__name__ == "S3FileSystem"

    def read(self, path: str) -> tuple[bytes, str] | None:
        """The object's bytes and tag (ETag, or its sha256 elsewhere); ``None`` if it is absent."""
        if self.atomic:  # the tag first: bytes newer than it only make a later replace fail, never succeed wrongly
            bucket, key, _ = self.fs.split_path(path)
            try:
                head = self.fs.call_s3("head_object", Bucket=bucket, Key=key)
                self.fs.invalidate_cache(path)
                return self.fs.cat_file(path), str(head["ETag"])
            except FileNotFoundError:
                return None
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def create(self, path: str, data: bytes) -> str:
        """Write ``data`` only if ``path`` is absent; its tag. Raises :class:`Conflict` if it exists."""
        if self.atomic:
            return self._put(path, data, IfNoneMatch="*")
        if self.fs.exists(path):
            raise Conflict(path)
        self.fs.pipe_file(path, data)
        return _digest(data)

    def replace(self, path: str, data: bytes, tag: str) -> str:
        """Write ``data`` only if ``path`` still has tag ``tag``; its new tag. Raises :class:`Conflict` otherwise."""
        if self.atomic:
            return self._put(path, data, IfMatch=tag)
        current = self.read(path)
        if current is None or current[1] != tag:
            raise Conflict(path)
        self.fs.pipe_file(path, data)
        return _digest(data)

    def _put(self, path: str, data: bytes, **condition: str) -> str:
        bucket, key, _ = self.fs.split_path(path)
        try:
            out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except (FileExistsError, FileNotFoundError) as exc:
            # s3fs maps 412 PreconditionFailed to FileExistsError; If-Match on a deleted object is 404
            if isinstance(exc, FileNotFoundError) and "IfNoneMatch" in condition:
                raise
            raise Conflict(path) from None
        except OSError as exc:
            if "precondition" in str(exc).lower() or "conditional" in str(exc).lower():
                raise Conflict(path) from None
            raise
        return str(out["ETag"])


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def object_tag(info: Mapping[str, Any]) -> str | None:
    """What the store says identifies an object's current version (ETag, generation, blob id), ``None`` if nothing.

    A digest is reused only while this tag (and the size) is the one it was computed for:
    a rewritten object gets a new tag on S3 (ETag), GCS (generation) and the Hub (blob id).
    """
    parts = [f"{key}={info[key]}" for key in ("ETag", "etag", "VersionId", "generation", "md5Hash", "blob_id", "crc32c")
             if info.get(key)]
    if "lfs" in info and isinstance(info["lfs"], Mapping) and info["lfs"].get("sha256"):
        parts.append(f"lfs={info['lfs']['sha256']}")
    return ";".join(parts) or None
