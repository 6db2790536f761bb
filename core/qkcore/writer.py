"""Buffered, crash-resumable staging of captured rows, and the final Parquet files: :class:`DatasetWriter`.

A :class:`DatasetWriter` owns one staging directory (the run layer puts it at
``DATA_ROOT/.qkcore/staging``)::

    part-000000.arrow ...  one Arrow IPC file (zstd) per spill, holding every config
                           that had buffered rows, sorted and indexed (staging/parts.py)
    journal.json           the last commit: run_key, committed parts, configs, caller
                           state (staging/journal.py)

A part is written to a temp file, fsynced and renamed, so it is complete or absent.
Parts written after the last commit are not in the journal: a resumed run deletes
them and the caller re-adds those rows.

:meth:`DatasetWriter.write_final_files` merges the parts of each config in bounded memory
(staging/merge.py) into its final file in a folder the caller names
(``lXXhYY[qk]/data.parquet``, see :mod:`qkcore.datafile` for its columns and bytes)
and returns their statistics; it never touches a data root's published files. Rows
are sorted by (``example_id``, 64-bit id, ``position``), stably (staging/rows.py), so
the bytes depend only on the rows and their arrival order, never on chunking, spill
threshold, commit frequency or a crash + resume (same pyarrow).

This module composes those jobs; callers use only :class:`DatasetWriter` and the
names in ``__all__``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qkcore.datafile import DEFAULT_ROW_GROUP_SIZE, ConfigStats, write_data_file
from qkcore.fsutil import remove_tree, write_durably
from qkcore.layout import DATA_FILE, config_name, row_bytes
from qkcore.staging import journal as journals
from qkcore.staging.journal import JOURNAL_FILE, Journal, StagingConflict, read_journal
from qkcore.staging.merge import sorted_runs
from qkcore.staging.parts import Slice, Spill, load_index, part_name
from qkcore.staging.rows import Rows, to_int32

__all__ = [
    "JOURNAL_FILE",
    "CapturedChunk",
    "ConfigStats",
    "DatasetWriter",
    "StagingConflict",
    "read_journal",
]


@dataclass
class CapturedChunk:
    """Rows captured for one (layer, kind) in one forward pass, shared positions across heads."""

    layer: int
    kind: str  # "q" or "k"
    heads: list[int]  # head indices, aligned with vectors' first axis
    example_ids: np.ndarray  # int64, shape (n,): normalised 64-bit example ids
    positions: np.ndarray  # int64, shape (n,)
    buckets: np.ndarray  # int64, shape (n,)
    vectors: np.ndarray  # float32, shape (len(heads), n, head_dim)
    sliding_window: int | None
    token_strings: np.ndarray | None = None  # object (str), shape (n,): the token at each row (shared by heads)


@dataclass
class _ConfigBuffer:
    """Identity and not-yet-spilled rows of one config (layer, head, kind)."""

    head_dim: int
    sliding_window: int | None
    pending: list[Rows] = field(default_factory=list)
    nbytes: int = 0


class DatasetWriter:
    """Collects captured chunks per config, spills to staging, commits, resumes, writes final files.

    Memory bound (``T = flush_threshold_mb``, ``R = row_group_size``):

    * capture: buffered rows stay below ``T`` plus the last added chunk. The ``add``
      that crosses ``T`` spills every config into one part file, gathering one part
      batch at a time (no second copy of the buffer).
    * ``write_final_files()`` never loads a whole config (staging/merge.py). It splits each
      config, in sort order, into key ranges of at most ``T/2`` of rows (whole
      documents, or position ranges of a document larger than that), gathers a range
      from the part batches that overlap it (each at most ``T/8`` and 8192 rows) and
      sorts it into a second copy: at most ``T`` of rows at once. Row-group assembly
      (:mod:`qkcore.datafile`) adds fewer than ``2R`` rows (carry-over and the group
      being written) plus the Parquet writer's buffer of one group; the part indexes
      (a few integers per config, part and document) and, while an oversized document
      is split, its positions are small. With the defaults (256 MB, 65536-row groups
      of 34 MB at head_dim 128) that is about ``T + 100 MB``. Only a single (document, position) key repeated over ``T/2``
      worth of rows can exceed it (a range cannot split one key).

    Crash-resume: ``commit(state)`` makes every row added so far durable and records
    ``state``; a writer opened later with the same ``run_key`` resumes there
    (``resumed_state``). One writer per staging directory at a time (the run layer
    holds the data root's lock).
    """

    def __init__(
        self,
        staging_dir: Path | str,
        *,
        flush_threshold_mb: float = 256.0,
        row_group_size: int | None = None,
        run_key: str | None = None,
        restart: bool = False,
        token_strings: bool = False,
    ) -> None:
        """Open a writer; resume the staged run of the same ``run_key`` if there is one.

        ``token_strings``: rows carry a ``token_str`` column (``capture.capture_token_strings``).

        Raises :class:`StagingConflict` if ``staging_dir`` holds a committed run of a
        different ``run_key`` (or this writer has none), unless ``restart`` discards it.
        Creates nothing on disk: that waits for the first spill or commit.
        """
        if not flush_threshold_mb > 0:  # the rule of output.flush_threshold_mb (config.py), for direct callers
            raise ValueError(f"flush_threshold_mb must be > 0, got {flush_threshold_mb}")
        if row_group_size is not None and row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.flush_threshold_bytes = int(flush_threshold_mb * 1024 * 1024)
        # A fixed default (not derived from the threshold) so bytes never depend on it.
        self.row_group_size = row_group_size or DEFAULT_ROW_GROUP_SIZE
        self.run_key = run_key
        self.token_strings = token_strings
        self._staging = Path(staging_dir)
        self._buffers: dict[str, _ConfigBuffer] = {}
        self._buffered = 0
        self._committed: list[str] = []  # part file names listed in the journal
        self._uncommitted: list[str] = []  # written since the last commit
        self._next_part = 0
        self._resumed_state: Any = None
        self._created_top: Path | None = None  # highest directory this writer created
        self._done = False
        self._finalize_peak_rows = 0
        if restart:
            remove_tree(self._staging)
        if (self._staging / JOURNAL_FILE).exists():
            self._resume()
        elif self._staging.exists():
            # No journal: the previous run died before its first commit, nothing to keep.
            remove_tree(self._staging)

    # -- properties ---------------------------------------------------------
    @property
    def staging_dir(self) -> Path:
        """Where parts and the journal live until the run layer removes them."""
        return self._staging

    @property
    def resumed_state(self) -> Any:
        """The ``state`` of the commit this writer resumed from, else ``None``."""
        return self._resumed_state

    @property
    def finalize_peak_rows(self) -> int:
        """Most rows the last ``write_final_files()`` held at once while sorting (a diagnostic)."""
        return self._finalize_peak_rows

    def buffered_bytes(self) -> int:
        """Bytes currently held in memory (not yet spilled)."""
        return self._buffered

    # -- capture ------------------------------------------------------------
    def add(self, chunk: CapturedChunk) -> None:
        """Split ``chunk`` per head into config buffers; spill if over the threshold."""
        self._check_open()
        vectors = np.asarray(chunk.vectors)
        if vectors.ndim != 3 or vectors.shape[0] != len(chunk.heads) or vectors.shape[2] < 1:
            raise ValueError(
                f"vectors must be (len(heads)={len(chunk.heads)}, n, head_dim>=1), got {vectors.shape}"
            )
        if len(set(chunk.heads)) != len(chunk.heads):
            raise ValueError(f"duplicate heads in chunk: {chunk.heads}")
        n, head_dim = vectors.shape[1], vectors.shape[2]
        ids64 = np.asarray(chunk.example_ids, dtype=np.int64).reshape(-1)
        if len(ids64) != n or len(chunk.positions) != n or len(chunk.buckets) != n:
            raise ValueError("example_ids, positions and buckets must each have n rows")
        # Converted once per chunk and shared (read-only) by every head's buffer.
        positions = to_int32(chunk.positions, "position")
        buckets = to_int32(chunk.buckets, "bucket")
        sw = None if chunk.sliding_window is None else int(chunk.sliding_window)
        if (chunk.token_strings is not None) != self.token_strings:
            raise ValueError(f"this writer {'needs' if self.token_strings else 'takes no'} token_strings")
        tokens = None
        if chunk.token_strings is not None:
            tokens = np.asarray(chunk.token_strings, dtype=object).reshape(-1)
            if len(tokens) != n:
                raise ValueError("token_strings must have n rows")
        for i, head in enumerate(chunk.heads):
            name = config_name(chunk.layer, int(head), chunk.kind)
            buf = self._buffers.get(name)
            if buf is None:
                buf = self._buffers[name] = _ConfigBuffer(head_dim=head_dim, sliding_window=sw)
            elif buf.head_dim != head_dim:
                raise ValueError(f"{name}: head_dim {head_dim} conflicts with {buf.head_dim}")
            elif buf.sliding_window != sw:
                raise ValueError(
                    f"{name}: sliding_window {sw} conflicts with {buf.sliding_window}"
                )
            if n == 0:
                continue  # the config is still recorded, so write_final_files() writes an empty file
            # Copy: the caller may reuse its capture buffer after add() returns.
            rows = Rows(ids64, positions, buckets, np.array(vectors[i], dtype=np.float32, copy=True), tokens)
            buf.pending.append(rows)
            buf.nbytes += rows.nbytes
            self._buffered += rows.nbytes
        if self._buffered > self.flush_threshold_bytes:
            self._spill()

    def commit(self, state: Any) -> None:
        """Make every row added so far durable and record ``state`` (JSON-able) in the journal.

        After this returns, a crash (even ``kill -9``) loses nothing added before it:
        a writer opened with the same ``run_key`` resumes here and returns ``state``
        as ``resumed_state``.
        """
        self._check_open()
        if self.run_key is None:
            raise ValueError("commit() needs a writer opened with a run_key")
        # Round-trip now: a non-JSON state fails before anything is written, and later
        # mutation of the caller's dict cannot change what was committed.
        state = json.loads(json.dumps(state))
        self._spill()
        self._ensure_staging()
        self._write_journal(self._committed + self._uncommitted, state)
        self._committed += self._uncommitted
        self._uncommitted = []

    def adopt(self, other_staging: Path | str) -> None:
        """Take over the committed parts of the writer staged at ``other_staging`` (a torchrun rank's).

        Parts are hard-linked in (no copy) and count as uncommitted until this
        writer's next ``commit``; ``other_staging`` is left intact so a crash before
        that commit loses nothing. Remove it once the commit is made.
        """
        self._check_open()
        other = Path(other_staging)
        configs, parts = journals.committed_parts(other)
        for name, meta in configs.items():
            buf = self._buffers.setdefault(name, _ConfigBuffer(*meta))
            if (buf.head_dim, buf.sliding_window) != meta:
                raise ValueError(f"{other}: config {name} has head_dim/sliding_window that differ from this run's")
        self._ensure_staging()
        for part in parts:
            target = self._staging / part_name(self._next_part)
            target.unlink(missing_ok=True)
            os.link(other / part, target)
            self._next_part += 1
            self._uncommitted.append(target.name)

    # -- finishing ----------------------------------------------------------
    def write_final_files(self, target: Path | str) -> dict[str, ConfigStats]:
        """Write every config this run captured into ``target``; return each one's statistics.

        Each ``target/lXXhYY[qk]/data.parquet`` is written durably (temp file, fsync,
        rename). Staging is left as it is: the caller records the result with
        :meth:`commit`, then frees the parts with :meth:`drop_parts`.
        """
        self._check_open()
        self._spill()  # one code path: every row is read back from the parts
        slices = load_index([self._staging / part for part in self._committed + self._uncommitted])
        return {
            name: self._write_config(Path(target), name, self._buffers[name], slices.pop(name, []))
            for name in sorted(self._buffers)
        }

    def drop_parts(self) -> None:
        """Delete every part file once the committed state no longer needs them (after :meth:`write_final_files`).

        The journal is rewritten without parts first, so a crash in between leaves
        only orphan parts, which the next writer opened on this staging removes.
        """
        self._check_open()
        if self._uncommitted or self._buffered:
            raise RuntimeError("drop_parts() needs every row committed first")
        journal = read_journal(self._staging)
        if journal is None:
            raise RuntimeError("drop_parts() needs a commit first")
        self._write_journal([], journal["state"])
        for part in self._committed:
            (self._staging / part).unlink(missing_ok=True)
        self._committed = []

    def abort(self) -> None:
        """Drop rows added since the last commit; keep the journal and committed parts.

        The same command can then resume from the last commit. Without any commit,
        staging is removed entirely.
        """
        if self._done:
            return
        self._close()
        if not (self._staging / JOURNAL_FILE).exists():
            self._remove_staging()
            return
        keep = {JOURNAL_FILE, *self._committed}
        for path in self._staging.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove the staging directory entirely (committed state included)."""
        self._close()
        self._remove_staging()

    # -- internals ----------------------------------------------------------
    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("DatasetWriter is closed")

    def _close(self) -> None:
        self._buffers.clear()
        self._buffered = 0
        self._done = True

    def _remove_staging(self) -> None:
        remove_tree(self._staging)
        # Remove the directories this writer created, while empty: a failed run leaves nothing.
        path = self._staging.parent
        while self._created_top is not None and path != self._created_top.parent:
            try:
                path.rmdir()
            except OSError:
                break
            path = path.parent

    def _write_journal(self, parts: list[str], state: Any) -> None:
        configs = {name: (buf.head_dim, buf.sliding_window) for name, buf in self._buffers.items()}
        Journal(self.run_key, parts, self._next_part, configs, state).write(self._staging)

    def _ensure_staging(self) -> None:
        if self._staging.exists():
            return
        if self._created_top is None and not self._staging.exists():
            top = self._staging
            while not top.parent.exists():
                top = top.parent
            self._created_top = top
        self._staging.mkdir(parents=True)

    def _resume(self) -> None:
        journal = journals.resume(self._staging, self.run_key)
        self._committed = journal.parts
        self._next_part = journal.next_part
        self._buffers = {name: _ConfigBuffer(*meta) for name, meta in journal.configs.items()}
        self._resumed_state = journal.state

    def _spill(self) -> None:
        """Write every non-empty buffer into ONE new part file and free the memory."""
        names = sorted(name for name, buf in self._buffers.items() if buf.pending)
        if not names:
            return
        buffers = [self._buffers[name] for name in names]
        spill = Spill(
            [(name, buf.head_dim, buf.pending) for name, buf in zip(names, buffers)],
            max_batch_bytes=self.flush_threshold_bytes // 8,
            tokens=self.token_strings,
        )
        self._ensure_staging()
        name = part_name(self._next_part)
        write_durably(self._staging / name, spill.write)
        for buf in buffers:  # only now: a failed write loses nothing
            buf.pending, buf.nbytes = [], 0
        self._next_part += 1
        self._uncommitted.append(name)
        self._buffered = 0

    def _write_config(self, target: Path, name: str, buf: _ConfigBuffer, slices: list[Slice]) -> ConfigStats:
        # Half the threshold per range: sorting makes a second copy of it.
        budget = max(1, self.flush_threshold_bytes // (2 * row_bytes(buf.head_dim)))
        stats, peak = write_data_file(
            target / name / DATA_FILE,
            sorted_runs(slices, budget, buf.head_dim, self.token_strings),
            head_dim=buf.head_dim,
            sliding_window=buf.sliding_window,
            row_group_size=self.row_group_size,
            token_strings=self.token_strings,
        )
        self._finalize_peak_rows = max(self._finalize_peak_rows, peak)
        return stats
