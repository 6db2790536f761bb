"""Durable file operations: a reader or a crash sees the old file or the new one, never half of one.

Every file qkcore publishes or relies on after a crash (Parquet files, the card, the
staging journal, the data root's record) is written through :func:`write_durably`:
written to a temp file next to the target, fsynced, renamed over the target, and the
directory fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

_HASH_CHUNK = 2**18  # one reused buffer: hashing a large file costs 256 KiB of memory


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (which is where renames live), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temp file a durable write of ``path`` goes through (hidden, same directory)."""
    return path.with_name(f".{path.name}.tmp")


def write_durably(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` via ``write(temp)``, fsync, rename over ``path``, fsync the directory."""
    tmp = temp_path(path)
    try:
        write(tmp)
        fsync(tmp)  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def write_text_durably(path: Path, text: str) -> None:
    """:func:`write_durably` for a UTF-8 text file."""
    write_durably(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def move_durably(source: Path, target: Path) -> None:
    """Rename ``source`` over ``target`` (same filesystem) and make both directory entries durable."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)
    fsync(target.parent)
    if source.parent != target.parent:
        fsync(source.parent)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def remove_tree(path: Path) -> None:
    """Remove a directory tree if it exists; errors other than "already gone" propagate."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
