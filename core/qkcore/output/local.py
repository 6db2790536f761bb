"""The local-folder data root: published files in a directory, published by rename.

Layout (names in :mod:`qkcore.layout` for the published part)::

    DATA_ROOT/
      README.md, qkcore.json, lXXhYY[qk]/data.parquet    the published dataset: one run
      .qkcore/
        lock, lock.json      one qkcore process per data root, and who holds it
        run.json             the record: which run the published files belong to, their
                             sizes and hashes, whether they were pushed (output/record.py)
        staging/             the capture in progress (spill parts + journal, see writer.py)
        final/               the next run's finished files, waiting to be published
        ranks/rank-NNN/      torchrun ranks' staging until rank 0 merges them

**The rule.** A data root holds exactly one run. A run with another identity (see
:mod:`qkcore.identity`) is refused, naming both, unless ``--replace``; then the previous
run's dataset files are removed when the new run *publishes*, never before, so a failed
or interrupted new run leaves the old one intact. Files pulled from a Hub branch count
as a previous run.

**Publishing** (:meth:`LocalDataRoot.publish`) moves finished files from ``final/`` into
place under a record that says so first: ``run.json`` is written with state
``publishing``, dataset files not in the new run are removed, the new files are renamed
in, and ``run.json`` is rewritten with state ``complete``. A kill anywhere in between
leaves a record saying which run is half-published; the same command finishes it, and
``qkcore push`` refuses such a root.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import uuid
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import structlog

from qkcore.errors import QkcoreError
from qkcore.filehash import cached_sha256, identity_key
from qkcore.fsutil import fsync, move_durably, remove_tree, sha256_file, write_text_durably
from qkcore.layout import CARD_FILE, MANIFEST_FILE, config_file, configs_in
from qkcore.manifest import Manifest, read_manifest
from qkcore.output.record import RECORD_FILE, FileEntry, Record

STATE_DIR = ".qkcore"
_LOCK_FILE = "lock"
_HOLDER_FILE = "lock.json"
_VERIFIED_FILE = "verified.json"
#: Files in the state folder that record nothing about a run (the lock, its holder, the hash caches).
_NOT_STATE = (_LOCK_FILE, _HOLDER_FILE, "hashes.json", _VERIFIED_FILE)
_PROBE_FILE = ".write-probe"

log = structlog.get_logger(__name__)


class LocalDataRoot:
    """A :class:`~qkcore.output.protocol.DataRoot` that is a local folder (see the module docstring)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.state_dir = self.path / STATE_DIR
        self.staging_dir = self.state_dir / "staging"
        self.final_dir = self.state_dir / "final"
        self.ranks_dir = self.state_dir / "ranks"
        self._created: Path | None = None  # the highest directory check_usable() created

    @property
    def location(self) -> str:
        """The folder, for messages."""
        return str(self.path)

    @property
    def work_dir(self) -> Path:
        """The hidden state folder, which holds the work folders (same filesystem: publishing renames)."""
        return self.state_dir

    def has_state(self) -> bool:
        """Whether the hidden state folder exists."""
        return self.state_dir.is_dir()

    # -- checks -------------------------------------------------------------
    def check_usable(self) -> None:
        """Fail now, with one line, if the data root cannot hold a run: a file, unwritable, read-only.

        Creates ``DATA_ROOT/.qkcore/`` (and the data root) with a probe file; :meth:`forget_if_unused`
        removes what this created when the run ends without writing anything.
        """
        if self.path.exists() and not self.path.is_dir():
            raise QkcoreError(f"output.data_root: {self.path} is a file, not a directory")
        missing = self.path
        while not missing.parent.exists():
            missing = missing.parent
        try:
            if not self.path.exists():
                self._created = missing
            self.state_dir.mkdir(parents=True, exist_ok=True)
            probe = self.state_dir / _PROBE_FILE
            probe.write_bytes(b"qkcore")
            probe.unlink()
        except OSError as exc:
            raise QkcoreError(f"output.data_root: cannot write to {self.path}: {exc.strerror or exc}") from None

    def forget_if_unused(self) -> None:
        """Remove the data root :meth:`check_usable` created, if the run left nothing in it.

        An existing data root keeps its hidden ``.qkcore/`` (the lock file is never deleted
        there: deleting a lock file another process has open would let two processes hold it).
        """
        if self._created is None or not self.state_dir.is_dir():
            return
        if any(p.name not in _NOT_STATE for p in self.state_dir.iterdir()):
            return
        if any(p.name != STATE_DIR for p in self.path.iterdir()):
            return
        remove_tree(self.state_dir)
        path = self.path
        while path != self._created.parent:
            try:
                path.rmdir()
            except OSError:
                break
            path = path.parent

    @contextmanager
    def locked(self, command: str, *, held: str | None = None) -> Iterator[str]:
        """Hold the data root's exclusive lock; a second process fails at once, naming the holder.

        Yields the lock's token (kept in ``lock.json``). With ``held=TOKEN`` this process
        takes no lock: it checks that the lock is held, by another live process, under
        ``TOKEN`` (the ``qkcore sweep`` that started this task).
        """
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.state_dir / _LOCK_FILE), timeout=0)
        if held is not None:
            yield self._check_held(lock, held)
            return
        try:
            lock.acquire()
        except Timeout:
            raise QkcoreError(f"output.data_root: {self.path} is in use by {self._holder()}; wait for it to finish") from None
        except OSError as exc:
            raise QkcoreError(f"output.data_root: cannot lock {self.path}: {exc.strerror or exc}") from None
        try:
            token = uuid.uuid4().hex
            holder = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "user": _user(),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": command,
                "token": token,
            }
            (self.state_dir / _HOLDER_FILE).write_text(json.dumps(holder), encoding="utf-8")
            yield token
        finally:
            (self.state_dir / _HOLDER_FILE).unlink(missing_ok=True)
            lock.release()

    def _check_held(self, lock: object, token: str) -> str:
        """``token`` if the lock is held under it by a live process, else one line saying who holds it (or that nobody does)."""
        from filelock import Timeout

        try:
            lock.acquire()  # type: ignore[attr-defined]
        except Timeout:  # held: by whom?
            try:
                holder = json.loads((self.state_dir / _HOLDER_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                holder = {}
            if holder.get("token") == token:
                return token
            raise QkcoreError(
                f"output.data_root: {self.path} is in use by {self._holder()}, not by the sweep that started this task"
            ) from None
        except OSError as exc:
            raise QkcoreError(f"output.data_root: cannot lock {self.path}: {exc.strerror or exc}") from None
        lock.release()  # type: ignore[attr-defined]
        raise QkcoreError(
            f"output.data_root: {self.path} is no longer held by the sweep that started this task (it ended); "
            "run the sweep again, it resumes from the last commit"
        )

    def _holder(self) -> str:
        try:
            holder = json.loads((self.state_dir / _HOLDER_FILE).read_text(encoding="utf-8"))
            return (
                f"process {holder['pid']} on {holder['host']} (user {holder.get('user', '?')}, since {holder['since']}: "
                f"{holder['command']})"
            )
        except (OSError, ValueError, KeyError):
            return "another qkcore process"

    # -- what is there --------------------------------------------------------
    def read_record(self) -> Record | None:
        """The record of the run this root publishes, or ``None`` when there is none."""
        path = self.state_dir / RECORD_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return Record.from_json(text, path)

    def write_record(self, record: Record) -> None:
        """Write the record durably (temp file, fsync, rename)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_text_durably(self.state_dir / RECORD_FILE, record.to_json())

    def dataset_files(self) -> list[str]:
        """Published files on disk (repo paths): the card, the manifest and every config's data file."""
        if not self.path.is_dir():
            return []
        files = [name for name in (CARD_FILE, MANIFEST_FILE) if (self.path / name).is_file()]
        return files + [config_file(name) for name in configs_in(self.path)]

    def verify(self, record: Record) -> list[str]:
        """Problems with the published files against ``record`` (empty: they match exactly).

        The one check of "unchanged", for ``qkcore sniff`` and ``qkcore push`` alike: every
        recorded file is there with its recorded size and sha256, and no dataset file is
        there that the record does not list. A file is read again unless its identity
        (inode, size, mtime, ctime: :mod:`qkcore.filehash`) is that of an earlier hash
        that matched, which ``.qkcore/verified.json`` keeps, so a no-op rerun of a large
        root takes seconds and a file changed in place (its size and mtime kept) is
        still found.
        """
        cache = _VerifiedHashes(self.state_dir / _VERIFIED_FILE)
        problems: list[str] = []
        for name, entry in record.files.items():
            path = self.path / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                problems.append(f"{name} is missing")
                continue
            if size != entry.size:
                problems.append(f"{name} has {size} bytes, recorded {entry.size}")
            elif cache.sha256(path) != entry.sha256:
                problems.append(f"{name} changed (its sha256 is not the recorded one)")
        cache.save()
        extra = sorted(set(self.dataset_files()) - set(record.files))
        problems += [f"{name} is not part of the run" for name in extra]
        return problems

    # -- publishing -----------------------------------------------------------
    def publish(self, record: Record) -> Record:
        """Make the root hold exactly ``record.files``, taking new files from ``final/``; return the complete record.

        Resumable: called again after a kill, it finishes the same publish (files already
        moved are checked against the record, the rest are moved).
        """
        record = replace(record, state="publishing")
        self.write_record(record)
        wanted = set(record.files)
        for name in self.dataset_files():
            if name not in wanted:  # the previous run's files (approved with --replace)
                (self.path / name).unlink()
                _remove_empty_config_dir(self.path / name)
        for name, entry in record.files.items():
            source, target = self.final_dir / name, self.path / name
            if source.is_file():
                move_durably(source, target)
            elif not (target.is_file() and target.stat().st_size == entry.size and sha256_file(target) == entry.sha256):
                raise QkcoreError(
                    f"{self.path}: {name} of run {record.run_key} is neither waiting in {self.final_dir} nor in place; "
                    "rerun with --restart to capture again"
                )
        fsync(self.path)
        # Analysis outputs of the run these files replaced would look current beside them.
        from qkcore.analysis.provenance import remove_stale_outputs

        for name in remove_stale_outputs(self.path, record.run_key):
            log.info("removed an analysis output of another run", file=name, run=record.run_key)
        files = {name: FileEntry(e.size, e.sha256, (self.path / name).stat().st_mtime_ns) for name, e in record.files.items()}
        record = replace(record, state="complete", files=files)
        self.write_record(record)
        remove_tree(self.final_dir)
        return record

    def read_manifest(self) -> Manifest | None:
        """The published ``qkcore.json``, ``None`` if there is none; a broken one raises :class:`QkcoreError`."""
        return read_manifest(self.path / MANIFEST_FILE)

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """The data root itself: its files are local already."""
        yield self.path

    def save_staged(self, rank: int) -> None:
        """Nothing: the staging folder is where every process on this machine sees it."""

    def load_staged(self, rank: int) -> None:
        """Nothing: the staging folder is already here."""

    def discard_work(self) -> None:
        """Remove staged and finished-but-unpublished work (staging, final, ranks); published files stay."""
        for folder in (self.staging_dir, self.final_dir, self.ranks_dir):
            remove_tree(folder)

    def rank_staging(self, rank: int) -> Path:
        """Where torchrun rank ``rank`` stages its parts."""
        return self.ranks_dir / f"rank-{rank:03d}"

    def staged_ranks(self) -> list[int]:
        """Ranks whose staging exists."""
        if not self.ranks_dir.is_dir():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.ranks_dir.iterdir() if p.name.startswith("rank-"))


class _VerifiedHashes:
    """The published files' sha256 by identity (:mod:`qkcore.filehash`), kept in ``.qkcore/verified.json``.

    A cache, not a record: lost or unreadable, every file is hashed again. It keeps only
    the files of the last check, so it never grows.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            self._before: dict[str, str] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self._before = {}
        self._cache = dict(self._before)
        self._used: set[str] = set()

    def sha256(self, path: Path) -> str:
        """The file's sha256, from the cache when its identity is unchanged, else read."""
        digest = cached_sha256(path, self._cache)
        self._used.add(identity_key(path))
        return digest

    def save(self) -> None:
        """Keep the entries of the files checked this time (when they changed)."""
        kept = {key: self._cache[key] for key in sorted(self._used) if key in self._cache}
        if kept != self._before and self.path.parent.is_dir():
            write_text_durably(self.path, json.dumps(kept, indent=1, sort_keys=True))


def _remove_empty_config_dir(path: Path) -> None:
    try:
        path.parent.rmdir()
    except OSError:
        pass


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is no reason to fail
        return str(os.getuid()) if hasattr(os, "getuid") else "?"
