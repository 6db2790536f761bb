"""When a cached sha256 may be reused: the one "unchanged" check of ``qkcore sniff`` and ``qkcore push``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from qkcore import filehash
from qkcore.config import load_config
from qkcore.output import LocalDataRoot
from qkcore.sniff import run_sniff


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """Every file :mod:`qkcore.filehash` reads to hash it."""
    seen: list[Path] = []
    real = filehash.sha256_file

    def counting(path: Path) -> str:
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(filehash, "sha256_file", counting)
    return seen


def _keep_size_and_mtime(path: Path, data: bytes) -> None:
    stat = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_an_unchanged_file_is_read_once_and_a_change_keeping_size_and_mtime_is_read_again(tmp_path, reads, monkeypatch) -> None:
    monkeypatch.setattr(filehash, "TRUST_AFTER_NS", 0)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    cache: dict[str, str] = {}
    assert filehash.cached_sha256(path, cache) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert filehash.cached_sha256(path, cache) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert reads == [path.resolve()]
    _keep_size_and_mtime(path, b"b" * 1000)
    assert filehash.cached_sha256(path, cache) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(reads) == 2


def test_a_file_changed_just_before_its_hash_is_not_cached(tmp_path, reads) -> None:
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"x" * 10)  # changed now: within the racy window of the default margin
    cache: dict[str, str] = {}
    filehash.cached_sha256(path, cache)
    filehash.cached_sha256(path, cache)
    assert cache == {} and len(reads) == 2


def test_a_no_op_check_of_a_data_root_reads_no_file_and_still_sees_a_change(tiny_config, tmp_path, reads, monkeypatch) -> None:
    run_sniff(load_config(tiny_config()))
    root = LocalDataRoot(tmp_path / "out")
    record = root.read_record()
    monkeypatch.setattr(filehash, "TRUST_AFTER_NS", 0)
    assert root.verify(record) == []
    first = len(reads)
    assert first == len(record.files)
    assert root.verify(record) == [] and len(reads) == first  # the full check, from the cache
    victim = next(root.path.glob("l*/data.parquet"))
    data = bytearray(victim.read_bytes())
    data[100] ^= 1
    _keep_size_and_mtime(victim, bytes(data))
    name = victim.relative_to(root.path).as_posix()
    assert root.verify(record) == [f"{name} changed (its sha256 is not the recorded one)"]
    assert reads[first:] == [victim.resolve()]


def test_a_gguf_header_is_parsed_once_per_file_identity(tmp_path, monkeypatch) -> None:
    from qkcore.sources import gguf
    from tests.gguf_tiny import write_header_only_gguf

    monkeypatch.setattr(filehash, "TRUST_AFTER_NS", 0)
    path = write_header_only_gguf(tmp_path / "a.gguf", "llama")
    parsed: list[str] = []
    real = gguf._read_metadata.__wrapped__

    def counting(*args):
        parsed.append(args[0])
        return real(*args)

    monkeypatch.setattr(gguf, "_read_metadata", counting)
    cache: dict[str, str] = {}
    first = gguf.gguf_metadata(path, cache)
    assert gguf.gguf_metadata(path, cache) == first and first.architecture == "llama" and len(parsed) == 1
    write_header_only_gguf(tmp_path / "b.gguf", "qwen2")
    stat = path.stat()
    path.write_bytes((tmp_path / "b.gguf").read_bytes())  # another file's bytes in place
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf.gguf_metadata(path, cache).architecture == "qwen2" and len(parsed) == 2
