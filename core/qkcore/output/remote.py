"""A data root on object storage (``s3://bucket/prefix``; ``gs://``, ``hf://``, ``memory://`` alike), through fsspec.

Layout on the store (``ROOT`` is the URL)::

    ROOT/
      runs/<run_key>/README.md, qkcore.json, lXXhYY[qk]/data.parquet
                                 the published files: the same bytes as a local root
      .qkcore/
        run.json                 the record: written last, the commit point
        lease.json               the lock: holder, token, expiry (output/lease.py)
        ranks/rank-NNN/          a --shards task's committed staging (parts, then journal.json)

**The record is the commit point.** Object stores have no atomic rename, so
:meth:`RemoteDataRoot.publish` uploads the new run's files under ``runs/<its key>/``
(never under another run's key), checks that this process still holds the lease, writes
``run.json`` (state ``complete``), and only then deletes every other ``runs/*`` prefix
(the run ``--replace`` replaced, or leftovers of a run killed before its record). A
failed or killed publish changes no byte of the earlier run's files nor its record;
readers (:meth:`dataset_files`, :meth:`verify`, :meth:`read_manifest`,
:meth:`local_copy`) trust only files under the recorded run's key.

**Work folders are local**, one per root per machine: ``$QKCORE_WORK_DIR/<hash of the
URL>/`` or ``~/.cache/qkcore/work/<hash of the URL>/`` (staging, final, ranks, the hash
caches). :meth:`save_staged` uploads a shard's committed staging (parts first, the
journal last); :meth:`load_staged` downloads it, checking each part's size and sha256
against the journal.

**Verify** reads each recorded object's size and tag (ETag on S3) from a listing, and
reuses a sha256 only while the tag is the one it was computed for (``verified.json`` in
the work folder; the publish seeds it with the digests of the bytes it uploaded), so a
no-op rerun downloads nothing; an object rewritten on the store gets a new ETag and is
downloaded and hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import structlog

from qkcore.errors import QkcoreError
from qkcore.fsutil import remove_tree, sha256_file, write_text_durably
from qkcore.layout import MANIFEST_FILE, is_dataset_file
from qkcore.manifest import Manifest
from qkcore.output.lease import LEASE_FILE, Lease, check_held
from qkcore.output.record import RECORD_FILE, Record
from qkcore.output.store import Conditional, answering, object_tag, open_store
from qkcore.run_state import PublishedFile
from qkcore.staging.journal import JOURNAL_FILE, read_journal

log = structlog.get_logger(__name__)

STATE_DIR = ".qkcore"
RUNS_DIR = "runs"
_VERIFIED_FILE = "verified.json"
_NOT_STATE = ("hashes.json", _VERIFIED_FILE)
_CHUNK = 8 << 20


def work_dir_for(url: str) -> Path:
    """This machine's work folder for the data root ``url`` (``$QKCORE_WORK_DIR`` or ``~/.cache/qkcore/work``)."""
    base = os.environ.get("QKCORE_WORK_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qkcore", "work")
    return Path(base) / hashlib.sha256(url.encode()).hexdigest()[:16]


class RemoteDataRoot:
    """A :class:`~qkcore.output.protocol.DataRoot` on an fsspec filesystem (see the module docstring)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, work_dir: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self._options = dict(storage_options or {})
        self._fs: Any = None
        self._root = ""
        self._work = Path(work_dir) if work_dir is not None else work_dir_for(self.url)
        self.staging_dir = self._work / "staging"
        self.final_dir = self._work / "final"
        self.ranks_dir = self._work / "ranks"
        self._created_work = False
        self._lease: Lease | None = None
        self._held: str | None = None  # the sweep's token this process runs under (locked(held=...))

    # -- the store ---------------------------------------------------------------
    @property
    def fs(self) -> Any:
        """The fsspec filesystem (opened on first use: building a root touches nothing)."""
        if self._fs is None:
            self._fs, self._root = open_store(self.url, self._options)
        return self._fs

    def _path(self, *names: str) -> str:
        self.fs  # noqa: B018 - sets self._root
        return "/".join([self._root, *names])

    def _state(self, *names: str) -> str:
        return self._path(STATE_DIR, *names)

    def _run(self, run_key: str, *names: str) -> str:
        return self._path(RUNS_DIR, run_key, *names)

    @property
    def location(self) -> str:
        """The URL, for messages."""
        return self.url

    # -- local work folders -------------------------------------------------------
    @property
    def work_dir(self) -> Path:
        """This machine's work folder for the root."""
        return self._work

    def rank_staging(self, rank: int) -> Path:
        """Where rank (or shard) ``rank`` stages its parts on this machine."""
        return self.ranks_dir / f"rank-{rank:03d}"

    def staged_ranks(self) -> list[int]:
        """Ranks staged here or saved on the store."""
        ranks = set()
        if self.ranks_dir.is_dir():
            ranks |= {int(p.name.split("-")[1]) for p in self.ranks_dir.iterdir() if p.name.startswith("rank-")}
        with answering(self.url, "listing the staged shards"):
            folder = self._state("ranks")
            if self.fs.exists(folder):
                for entry in self.fs.ls(folder, detail=False, refresh=True):
                    name = entry.rstrip("/").rsplit("/", 1)[-1]
                    if name.startswith("rank-"):
                        ranks.add(int(name.split("-")[1]))
        return sorted(ranks)

    def save_staged(self, rank: int) -> None:
        """Upload rank ``rank``'s committed staging: the parts its journal lists that the store lacks, then the journal."""
        local = self.rank_staging(rank)
        journal = read_journal(local)
        if journal is None:
            return
        remote = self._state("ranks", local.name)
        sums = journal.get("part_sums") or {}
        with answering(self.url, f"saving the staging of shard {rank}"):
            there = self._sizes(remote)
            try:  # what the store's journal says of its parts: a resume may reuse a part's name for new rows
                saved = json.loads(self.fs.cat_file(f"{remote}/{JOURNAL_FILE}")).get("part_sums") or {}
            except (FileNotFoundError, ValueError, AttributeError):
                saved = {}
            for name in journal.get("parts", []):
                size = (local / name).stat().st_size
                if there.get(name) != size or not sums.get(name) or saved.get(name) != sums.get(name):
                    self.fs.put_file(str(local / name), f"{remote}/{name}")
            self.fs.put_file(str(local / JOURNAL_FILE), f"{remote}/{JOURNAL_FILE}")  # last: the commit point
            stale = set(there) - set(journal.get("parts", [])) - {JOURNAL_FILE}
            for name in sorted(stale):
                self.fs.rm_file(f"{remote}/{name}")

    def load_staged(self, rank: int) -> None:
        """Download rank ``rank``'s staging saved on the store (each part checked against the journal's size and sha256)."""
        local = self.rank_staging(rank)
        remote = self._state("ranks", local.name)
        with answering(self.url, f"loading the staging of shard {rank}"):
            try:
                text = self.fs.cat_file(f"{remote}/{JOURNAL_FILE}")
            except FileNotFoundError:
                return
            journal = json.loads(text)
            sums = journal.get("part_sums") or {}
            local.mkdir(parents=True, exist_ok=True)
            for name in journal.get("parts", []):
                target = local / name
                want = sums.get(name) or {}
                if target.is_file() and want and target.stat().st_size == want.get("size") \
                        and sha256_file(target) == want.get("sha256"):
                    continue
                partial = target.with_name(target.name + ".download")
                self.fs.get_file(f"{remote}/{name}", str(partial))
                if want and (partial.stat().st_size != want.get("size") or sha256_file(partial) != want.get("sha256")):
                    partial.unlink()
                    raise QkcoreError(f"{self.url}: {STATE_DIR}/ranks/{local.name}/{name} does not match its journal "
                                      "(size or sha256); rerun with --restart to capture that shard again")
                os.replace(partial, target)
        write_text_durably(local / JOURNAL_FILE, text.decode("utf-8"))

    def discard_work(self) -> None:
        """Remove staged and finished-but-unpublished work, here and on the store; published files stay."""
        for folder in (self.staging_dir, self.final_dir, self.ranks_dir):
            remove_tree(folder)
        with answering(self.url, "removing the staged shards"):
            if self.fs.exists(self._state("ranks")):
                self.fs.rm(self._state("ranks"), recursive=True)

    # -- use ----------------------------------------------------------------------
    def has_state(self) -> bool:
        """Whether qkcore used this root: its state is on the store or in this machine's work folder."""
        if self.staging_dir.is_dir() or self.final_dir.is_dir():
            return True
        with answering(self.url, "reading its state"):
            return bool(self.fs.exists(self._state(RECORD_FILE)) or self.fs.exists(self._state("ranks")))

    def check_usable(self) -> None:
        """Fail now, with one line, if the store does not answer or refuses a write; create the local work folder."""
        with answering(self.url, "checking that it can be written (a probe object)"):
            probe = self._state(f".write-probe-{os.getpid()}")
            self.fs.pipe_file(probe, b"qkcore")
            self.fs.rm_file(probe)
        try:
            if not self._work.exists():
                self._created_work = True
            self._work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QkcoreError(f"output.data_root: cannot create the work folder {self._work} for {self.url}: "
                              f"{exc.strerror or exc} (set QKCORE_WORK_DIR to a writable folder)") from None

    def forget_if_unused(self) -> None:
        """Remove the local work folder :meth:`check_usable` created, if the run left nothing in it."""
        if not self._created_work or not self._work.is_dir():
            return
        if any(p.name not in _NOT_STATE for p in self._work.iterdir()):
            return
        try:
            if self.read_record() is not None:  # a published run: keep its verified digests
                return
        except Exception:  # noqa: BLE001 - cleanup must not mask the run's own error; keep the folder
            return
        remove_tree(self._work)

    @contextmanager
    def locked(self, command: str, *, held: str | None = None) -> Iterator[str]:
        """Hold the root's lease (``ROOT/.qkcore/lease.json``, see :mod:`qkcore.output.lease`); yield its token.

        With ``held=TOKEN`` no lease is taken: the lease must be live under ``TOKEN`` (the sweep's).
        """
        store = Conditional(self.fs)
        if held is not None:
            with answering(self.url, "reading its lease"):
                token = check_held(store, self._state(LEASE_FILE), self.url, held)
            self._held = token
            try:
                yield token
            finally:
                self._held = None
            return
        lease = Lease(store, self._state(LEASE_FILE), self.url)
        with answering(self.url, "taking its lease"):
            token = lease.acquire(command)
        self._lease = lease
        try:
            yield token
        finally:
            self._lease = None
            lease.release()

    # -- the published run ----------------------------------------------------------
    def read_record(self) -> Record | None:
        """The record on the store, or ``None``."""
        with answering(self.url, "reading its record"):
            try:
                text = self.fs.cat_file(self._state(RECORD_FILE))
            except FileNotFoundError:
                return None
        return Record.from_json(text.decode("utf-8", errors="replace"), f"{self.url}/{STATE_DIR}/{RECORD_FILE}")

    def write_record(self, record: Record) -> None:
        """Write the record (one PUT: readers see the old one or the new one)."""
        with answering(self.url, "writing its record"):
            self.fs.pipe_file(self._state(RECORD_FILE), record.to_json().encode())

    def dataset_files(self) -> list[str]:
        """Dataset files under the recorded run's key (every run's, when the record is unreadable)."""
        from qkcore.output.record import UnreadableRecord

        try:
            record = self.read_record()
        except UnreadableRecord:
            with answering(self.url, "listing its files"):
                keys = [p.rstrip("/").rsplit("/", 1)[-1] for p in self._ls(self._path(RUNS_DIR))]
            return sorted({name for key in keys for name in self._listing(key)})
        if record is None:
            return []
        with answering(self.url, "listing its files"):
            return sorted(self._listing(record.run_key))

    def verify(self, record: Record) -> list[str]:
        """Problems with the published files against ``record``; a digest is reused only while the object's tag is unchanged."""
        cache = _Verified(self._work / _VERIFIED_FILE)
        problems: list[str] = []
        with answering(self.url, "checking its files"):
            listing = self._listing(record.run_key)
            for name, entry in record.files.items():
                info = listing.get(name)
                if info is None:
                    problems.append(f"{name} is missing")
                elif info["size"] != entry.size:
                    problems.append(f"{name} has {info['size']} bytes, recorded {entry.size}")
                else:
                    path = self._run(record.run_key, name)
                    tag = object_tag(info)
                    digest = cache.get(path, tag, info["size"])
                    if digest is None:
                        digest = self._sha256(path, info["size"])
                        cache.put(path, tag, info["size"], digest)
                    if digest != entry.sha256:
                        problems.append(f"{name} changed (its sha256 is not the recorded one)")
        cache.save()
        problems += [f"{name} is not part of the run" for name in sorted(set(listing) - set(record.files))]
        return problems

    def publish(self, record: Record) -> Record:
        """Upload the new files under ``runs/<key>/``, write the record (the commit point), then remove other runs.

        Resumable: the files wait in the local final folder until the record is written.
        """
        key = record.run_key
        cache = _Verified(self._work / _VERIFIED_FILE)
        with answering(self.url, f"publishing run {key}"):
            there = self._listing(key)  # a publish killed midway left some: they are uploaded again
            for name, entry in record.files.items():
                source, target = self.final_dir / name, self._run(key, name)
                if source.is_file():
                    self.fs.put_file(str(source), target)
                    self.fs.invalidate_cache(target)
                    info = self.fs.info(target)
                    if info["size"] != entry.size:
                        raise QkcoreError(f"{self.url}: {name} arrived with {info['size']} bytes, {entry.size} sent; "
                                          "rerun the same command to publish again")
                    cache.put(target, object_tag(info), info["size"], entry.sha256)
                    continue
                info = there.get(name)
                digest = None if info is None or info["size"] != entry.size else (
                    cache.get(target, object_tag(info), info["size"]) or self._sha256(target, info["size"]))
                if digest != entry.sha256:
                    raise QkcoreError(
                        f"{self.url}: {name} of run {key} is neither waiting in {self.final_dir} nor on the store; "
                        "rerun with --restart to capture again"
                    )
            cache.keep({self._run(key, name) for name in record.files})
            cache.save()
            if self._lease is not None:  # a run whose lease was taken over must not publish
                self._lease.check()
            elif self._held is not None:
                check_held(Conditional(self.fs), self._state(LEASE_FILE), self.url, self._held)
            files = {name: PublishedFile(e.size, e.sha256, 0) for name, e in record.files.items()}
            complete = replace(record, state="complete", files=files)
            self.write_record(complete)
            self._remove_other_runs(complete)
            if self.fs.exists(self._state("ranks")):  # a --shards run's staged shards: merged into what was published
                self.fs.rm(self._state("ranks"), recursive=True)
        remove_tree(self.final_dir)
        return complete

    def read_manifest(self) -> Manifest | None:
        """The published ``qkcore.json`` of the recorded run, ``None`` if there is none."""
        record = self.read_record()
        if record is None or MANIFEST_FILE not in record.files:
            return None
        path = self._run(record.run_key, MANIFEST_FILE)
        with answering(self.url, "reading its manifest"):
            try:
                text = self.fs.cat_file(path)
            except FileNotFoundError:
                return None
        return Manifest.from_json(text.decode("utf-8"), f"{self.url}/{RUNS_DIR}/{record.run_key}/{MANIFEST_FILE}")

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """The recorded run's files downloaded into a temporary folder of the work folder, each checked against the record."""
        record = self.read_record()
        if record is None or record.state != "complete":
            raise QkcoreError(f"output.data_root: {self.url} holds no finished qkcore run")
        self._work.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="copy-", dir=self._work))
        try:
            with answering(self.url, "downloading its files"):
                for name, entry in record.files.items():
                    target = folder / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get_file(self._run(record.run_key, name), str(target))
                    if target.stat().st_size != entry.size or sha256_file(target) != entry.sha256:
                        raise QkcoreError(f"{self.url}: {name} does not match its record (size or sha256); "
                                          "rerun `qkcore sniff` on this root to see what changed")
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------
    def _ls(self, path: str) -> list[str]:
        try:
            return [p for p in self.fs.ls(path, detail=False, refresh=True)]
        except FileNotFoundError:
            return []

    def _listing(self, run_key: str) -> dict[str, dict[str, Any]]:
        """Dataset files under ``runs/<run_key>/``: repo path -> the store's info (size, ETag...)."""
        prefix = self._run(run_key)
        self.fs.invalidate_cache(prefix)
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for path, info in found.items():
            name = path[len(prefix) + 1:] if path.startswith(prefix + "/") else None
            if name and is_dataset_file(name):
                out[name] = info
        return out

    def _sizes(self, prefix: str) -> dict[str, int]:
        self.fs.invalidate_cache(prefix)
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {path[len(prefix) + 1:]: int(info["size"]) for path, info in found.items() if path.startswith(prefix + "/")}

    def _sha256(self, path: str, size: int) -> str:
        """The object's sha256, read in ranges (each a call with a deadline)."""
        digest = hashlib.sha256()
        for start in range(0, size, _CHUNK):
            digest.update(self.fs.cat_file(path, start=start, end=min(size, start + _CHUNK)))
        return digest.hexdigest()

    def _remove_other_runs(self, record: Record) -> None:
        """After the record: every other run's prefix (replaced, or unrecorded leftovers), and stray files under this one."""
        keep = self._run(record.run_key)
        for path in self._ls(self._path(RUNS_DIR)):
            if path.rstrip("/") != keep:
                log.info("removed files of another run from the store", prefix=path)
                self.fs.rm(path, recursive=True)
        for name in sorted(set(self._listing(record.run_key)) - set(record.files)):
            self.fs.rm_file(self._run(record.run_key, name))


class _Verified:
    """Digests of objects by path, valid while the store's tag and size are those they were computed with."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            self._entries: dict[str, dict[str, Any]] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self._entries = {}
        self._before = json.dumps(self._entries, sort_keys=True)

    def get(self, path: str, tag: str | None, size: int) -> str | None:
        entry = self._entries.get(path)
        if tag is None or not isinstance(entry, dict) or entry.get("tag") != tag or entry.get("size") != size:
            return None
        return entry.get("sha256")

    def put(self, path: str, tag: str | None, size: int, sha256: str) -> None:
        if tag is not None:
            self._entries[path] = {"tag": tag, "size": size, "sha256": sha256}

    def keep(self, paths: set[str]) -> None:
        """Forget every entry but ``paths`` (the cache holds one run's files, so it never grows)."""
        self._entries = {path: entry for path, entry in self._entries.items() if path in paths}

    def save(self) -> None:
        if json.dumps(self._entries, sort_keys=True) != self._before and self.path.parent.is_dir():
            write_text_durably(self.path, json.dumps(self._entries, indent=1, sort_keys=True))
            self._before = json.dumps(self._entries, sort_keys=True)
