"""A file's sha256, cached by the file's identity: when a digest may be reused without reading the file.

qkcore hashes the same large files again and again: the weights and tokenizer files of
a run's identity, and every published data file to tell whether a data root still
holds exactly its recorded run (``qkcore sniff``'s "already complete", ``qkcore push``).
:func:`cached_sha256` is the one place that decides when the bytes need not be read
again; whether a file is *unchanged* is then always "its sha256 is the recorded one".

**The identity.** A cached digest is reused only when the file's real path, size,
mtime_ns, ctime_ns, device and inode are all those it had when it was hashed. Size and
mtime alone are not enough: new bytes can be written with the modification time put
back (``touch -r``, ``cp -p``, ``rsync -t``, a restore), and bit rot changes bytes
without touching either; the inode change time cannot be set from user space, and every
write, and every change of the mtime itself, sets it to the current time. Device and
inode tell a file replaced by another (renamed over it, restored from a copy) from the
one hashed. Anything that changes the identity only costs a rehash, never a wrong
answer: a copied or moved data root is hashed once again, then cached.

**Racy entries.** Timestamps have a granularity (the kernel's clock tick on Linux, up to
seconds on some filesystems), so a write in the same tick as the hash could leave the
ctime as it was. As git does for its index, a digest is cached only when the file's
ctime is at least :data:`TRUST_AFTER_NS` older than the moment hashing began, and
the file's identity did not change while it was read. A file changed (or published)
just before is hashed again next time, and cached then.

What this cannot see: a filesystem whose ctime does not follow changes, or a write to
the raw block device under the filesystem. Neither is a supported place for a data root.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path

from qkcore.fsutil import sha256_file

#: How much older than the hash the file's last change must be for the digest to be cached.
TRUST_AFTER_NS = 2_000_000_000


def identity_key(path: Path | str) -> str:
    """The cache key of the file ``path`` points to (symlinks resolved): its real path and identity."""
    real = Path(path).resolve()
    return _key(real, os.stat(real))


def cached_sha256(path: Path | str, cache: MutableMapping[str, str] | None = None) -> str:
    """sha256 of the file ``path`` points to (symlinks resolved), read only when ``cache`` cannot answer.

    ``cache`` maps :func:`identity_key` keys to digests; an entry is used when the
    file's identity is the one it was hashed with, and added after a hash when the file
    had not changed for :data:`TRUST_AFTER_NS` (see the module docstring).
    """
    return cached_by_identity(path, cache, sha256_file)


def cached_by_identity(
    path: Path | str, cache: MutableMapping[str, str] | None, compute: Callable[[Path], str], kind: str = ""
) -> str:
    """``compute(real path)``, a string that depends only on the file's bytes, cached by the file's identity.

    The rule of :func:`cached_sha256`, for anything else read from a file (``kind``
    names it in the key, e.g. a GGUF header's description).
    """
    real = Path(path).resolve()
    before = os.stat(real)
    identity = _key(real, before)
    key = f"{kind}|{identity}" if kind else identity
    if cache is not None and key in cache:
        return cache[key]
    started = time.time_ns()
    value = compute(real)
    if cache is not None and before.st_ctime_ns <= started - TRUST_AFTER_NS and _key(real, os.stat(real)) == identity:
        cache[key] = value
    return value


def _key(real: Path, stat: os.stat_result) -> str:
    return f"{real}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_dev}|{stat.st_ino}"
