"""Buffered, crash-resumable staging of captured rows, and the final Parquet files.

A :class:`DatasetWriter` owns one staging directory (the run layer puts it at
``DATA_ROOT/.qkcore/staging``)::

    part-000000.arrow ...  one Arrow IPC file (zstd) per spill, holding every config
                           that had buffered rows, in config-name order; each config's
                           rows are sorted and cut into record batches, and the file's
                           schema metadata indexes them (config, first batch, key range
                           of each batch, per-document row counts)
    journal.json           the last commit: run_key, committed parts, configs, caller state

A part is written to a temp file, fsynced and renamed, so it is complete or absent.
Parts written after the last commit are not in the journal: a resumed run deletes
them and the caller re-adds those rows.

:meth:`DatasetWriter.finalize` writes every config's final file into a folder the
caller names (``lXXhYY[qk]/data.parquet``, see :mod:`qkcore.layout`) and returns
their statistics; it never touches a data root's published files. Each final file
has exactly the columns ``bucket`` int32, ``example_id`` int32 (low 32 bits of the
normalised 64-bit id, signed), ``position`` int32, ``vector``
fixed_size_list<float32>[head_dim] and ``sliding_window`` int32 (nullable); it is
zstd-compressed and sorted by (``example_id``, 64-bit id, ``position``), stably:
rows with equal keys keep their arrival order. Sorting on the visible column first
makes it sorted on disk; the 64-bit id second keeps two documents whose int32 ids
collide contiguous. Row groups hold exactly ``row_group_size`` rows (the last one
fewer), so the bytes depend only on the rows and their arrival order, never on
chunking, spill threshold, commit frequency or a crash + resume (same pyarrow).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qkcore.errors import QkcoreError
from qkcore.fsutil import remove_tree, sha256_file, write_durably, write_text_durably
from qkcore.layout import (  # noqa: F401 (config_name, parse_config_name re-exported)
    DATA_FILE,
    TOKEN_COLUMN,
    config_name,
    low32,
    low32_ids,
    output_schema,
    parse_config_name,
)

JOURNAL_FILE = "journal.json"
DEFAULT_ROW_GROUP_SIZE = 65536
_JOURNAL_FORMAT = 1
_INDEX_KEY = b"qkcore.index"
_ID64 = "_example_id64"  # kept in parts only: the final sort needs the full id
_PART_BATCH_MAX_ROWS = 8192  # small batches let finalize() read only the key ranges it needs
_INT32_MIN, _INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)

# Writer options of the final files. No option here writes a timestamp;
# ``created_by`` only carries the pyarrow version, so output is reproducible for a
# given pyarrow.
_PARQUET_OPTS: dict[str, Any] = dict(
    compression="zstd",
    version="2.6",
    data_page_version="1.0",
    write_statistics=True,
    # Dictionary-encode only the small integer columns; float vectors never repeat.
    use_dictionary=["bucket", "example_id", "position", "sliding_window"],
    store_schema=True,  # keeps fixed_size_list (not plain list) on read-back
)

# Parts hold every config of a spill in one file, and configs may differ in
# head_dim, so the vector is a (large) variable-size list there. IPC rather than
# Parquet because opening a file and fetching one batch is cheap (Parquet footers
# with hundreds of row groups cost ~10 ms per open); zstd because vectors upcast
# from bf16 compress about 2x.
_PART_SCHEMA = pa.schema(
    [
        pa.field(_ID64, pa.int64()),
        pa.field("position", pa.int32()),
        pa.field("bucket", pa.int32()),
        pa.field("vector", pa.large_list(pa.float32())),
    ]
)
_IPC_OPTS = pa.ipc.IpcWriteOptions(compression="zstd")

_Key = tuple[int, int, int]  # (low 32 bits of id as int32, 64-bit id, position): the sort key


class StagingConflict(QkcoreError, ValueError):
    """The staging directory holds an unfinished run that this writer cannot resume.

    ``staged_run_key`` and ``staged_state`` describe what is there (``None`` when unreadable),
    so the caller can say how it differs from the run it wanted.
    """

    def __init__(self, message: str, staged_run_key: str | None = None, staged_state: Any = None) -> None:
        super().__init__(message)
        self.staged_run_key = staged_run_key
        self.staged_state = staged_state


@dataclass(frozen=True)
class ConfigStats:
    """What :meth:`DatasetWriter.finalize` wrote for one config."""

    rows: int
    bucket_counts: dict[int, int]  # bucket -> rows
    nonfinite_rows: int  # rows whose vector holds a NaN or an infinity
    head_dim: int
    sliding_window: int | None
    size: int  # bytes of data.parquet
    sha256: str  # of data.parquet


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







def _to_int32(values: np.ndarray, what: str) -> np.ndarray:
    """Checked int64 -> int32 conversion; never wrap silently."""
    values = np.asarray(values)
    if values.size and (int(values.min()) < _INT32_MIN or int(values.max()) > _INT32_MAX):
        raise ValueError(
            f"{what} out of int32 range [{int(values.min())}, {int(values.max())}]"
        )
    return values.astype(np.int32)


def read_config(path: Path | str) -> pa.Table:
    """Read one config (its directory or its ``data.parquet``) as a pyarrow Table."""
    path = Path(path)
    if path.is_dir():
        path = path / DATA_FILE
    return pq.read_table(path)




@dataclass
class _Rows:
    """Columnar rows of one config, as numpy arrays (buffering, spilling, sorting)."""

    ids64: np.ndarray  # int64
    positions: np.ndarray  # int32
    buckets: np.ndarray  # int32
    vectors: np.ndarray  # float32, (n, head_dim)
    tokens: np.ndarray | None = None  # object (str), (n,): the token_str column, when captured

    @classmethod
    def concat(cls, parts: Sequence[_Rows], head_dim: int, tokens: bool = False) -> _Rows:
        if not parts:
            return cls(
                np.empty(0, np.int64),
                np.empty(0, np.int32),
                np.empty(0, np.int32),
                np.empty((0, head_dim), np.float32),
                np.empty(0, object) if tokens else None,
            )
        if len(parts) == 1:
            return parts[0]
        return cls(
            np.concatenate([p.ids64 for p in parts]),
            np.concatenate([p.positions for p in parts]),
            np.concatenate([p.buckets for p in parts]),
            np.concatenate([p.vectors for p in parts]),
            np.concatenate([p.tokens for p in parts]) if parts[0].tokens is not None else None,
        )

    def __len__(self) -> int:
        return len(self.ids64)

    @property
    def nbytes(self) -> int:
        # Token strings: the pointers plus a typical short token (an estimate; they are small).
        text = 0 if self.tokens is None else self.tokens.nbytes + 56 * len(self.tokens)
        return self.ids64.nbytes + self.positions.nbytes + self.buckets.nbytes + self.vectors.nbytes + text

    def take(self, index: np.ndarray | slice) -> _Rows:
        """Rows selected by a mask, an index array (copies) or a slice (views)."""
        tokens = None if self.tokens is None else self.tokens[index]
        return _Rows(self.ids64[index], self.positions[index], self.buckets[index], self.vectors[index], tokens)

    def copy(self) -> _Rows:
        tokens = None if self.tokens is None else self.tokens.copy()
        return _Rows(self.ids64.copy(), self.positions.copy(), self.buckets.copy(), self.vectors.copy(), tokens)

    @classmethod
    def sorted_concat(cls, parts: Sequence[_Rows], head_dim: int, tokens: bool = False) -> _Rows:
        """``parts`` concatenated and sorted by key, copying the vectors only once."""
        if not parts:
            return cls.concat([], head_dim, tokens)
        order, ids64, positions, buckets = _sorted_columns(parts)
        text = np.concatenate([p.tokens for p in parts])[order] if parts[0].tokens is not None else None
        return cls(ids64, positions, buckets, _gather([p.vectors for p in parts], order, head_dim), text)

    def within(self, lo: _Key, hi: _Key) -> np.ndarray:
        """Mask of rows whose sort key lies in ``[lo, hi]`` (lexicographic)."""
        id32, id64, pos = low32_ids(self.ids64), self.ids64, self.positions

        def below(k: _Key) -> np.ndarray:
            return (id32 < k[0]) | ((id32 == k[0]) & ((id64 < k[1]) | ((id64 == k[1]) & (pos < k[2]))))

        def above(k: _Key) -> np.ndarray:
            return (id32 > k[0]) | ((id32 == k[0]) & ((id64 > k[1]) | ((id64 == k[1]) & (pos > k[2]))))

        return ~below(lo) & ~above(hi)


def _sort_order(ids64: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Order by (int32 id, 64-bit id, position); np.lexsort is stable, so ties keep arrival order."""
    return np.lexsort((positions, ids64, low32_ids(ids64)))


def _sorted_columns(parts: Sequence[_Rows]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort order of ``parts`` concatenated, and their id/position/bucket columns in that order."""
    ids64 = np.concatenate([p.ids64 for p in parts])
    positions = np.concatenate([p.positions for p in parts])
    order = _sort_order(ids64, positions)
    return order, ids64[order], positions[order], np.concatenate([p.buckets for p in parts])[order]


def _key(ids64: np.ndarray, positions: np.ndarray, i: int) -> _Key:
    return (low32(int(ids64[i])), int(ids64[i]), int(positions[i]))


def _gather(parts: Sequence[np.ndarray], index: np.ndarray, head_dim: int) -> np.ndarray:
    """``np.concatenate(parts)[index]`` without materialising the concatenation (memory bound)."""
    if len(parts) == 1:
        return parts[0][index]
    out = np.empty((len(index), head_dim), np.float32)
    starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
    which = np.searchsorted(starts, index, side="right") - 1
    for c in np.unique(which):
        sel = which == c
        out[sel] = parts[c][index[sel] - starts[c]]
    return out


def _row_bytes(head_dim: int) -> int:
    """Bytes of one row in memory (id64 + position + bucket + vector)."""
    return 16 + 4 * head_dim


def _part_schema(tokens: bool) -> pa.Schema:
    return _PART_SCHEMA.append(pa.field(TOKEN_COLUMN, pa.large_string())) if tokens else _PART_SCHEMA


def _part_batch(rows: _Rows) -> pa.RecordBatch:
    n, head_dim = rows.vectors.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * head_dim)
    vec = pa.LargeListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(rows.vectors).reshape(-1)))
    cols = [pa.array(rows.ids64), pa.array(rows.positions), pa.array(rows.buckets), vec]
    if rows.tokens is not None:
        cols.append(pa.array(rows.tokens, type=pa.large_string()))
    return pa.RecordBatch.from_arrays(cols, schema=_part_schema(rows.tokens is not None))


def _rows_from_batch(batch: pa.RecordBatch, head_dim: int) -> _Rows:
    flat = batch.column(3).flatten().to_numpy(zero_copy_only=False)
    tokens = batch.column(4).to_numpy(zero_copy_only=False) if batch.num_columns > 4 else None
    return _Rows(
        batch.column(0).to_numpy(zero_copy_only=False),
        batch.column(1).to_numpy(zero_copy_only=False),
        batch.column(2).to_numpy(zero_copy_only=False),
        flat.reshape(-1, head_dim),
        tokens,
    )


def _final_table(rows: _Rows, head_dim: int, sliding_window: int | None) -> pa.Table:
    n = len(rows)
    flat = pa.array(np.ascontiguousarray(rows.vectors, dtype=np.float32).reshape(-1))
    vec = pa.FixedSizeListArray.from_arrays(flat, head_dim)
    sw = pa.nulls(n, pa.int32()) if sliding_window is None else pa.array(
        np.full(n, sliding_window, dtype=np.int32)
    )
    cols = [pa.array(rows.buckets), pa.array(low32_ids(rows.ids64)), pa.array(rows.positions), vec, sw]
    if rows.tokens is not None:
        cols.append(pa.array(rows.tokens, type=pa.string()))
    return pa.Table.from_arrays(cols, schema=output_schema(head_dim, token_strings=rows.tokens is not None))


def _pack(sizes: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Greedy ``[start, end)`` spans of consecutive items summing to <= budget (an oversize item alone)."""
    cum = np.cumsum(sizes)
    spans: list[tuple[int, int]] = []
    start, base = 0, 0
    while start < len(sizes):
        end = max(start + 1, int(np.searchsorted(cum, base + budget, side="right")))
        spans.append((start, end))
        base, start = int(cum[end - 1]), end
    return spans


@dataclass
class _Slice:
    """One config's rows inside one part file: sorted batches and per-document counts."""

    path: Path
    first_batch: int
    keys: list[tuple[_Key, _Key]]  # (first, last) sort key of each batch
    ids: np.ndarray  # distinct 64-bit ids
    counts: np.ndarray  # rows per id


@dataclass
class _ConfigBuffer:
    """Identity and not-yet-spilled rows of one config (layer, head, kind)."""

    head_dim: int
    sliding_window: int | None
    pending: list[_Rows] = field(default_factory=list)
    nbytes: int = 0


def read_journal(staging_dir: Path | str) -> dict[str, Any] | None:
    """The committed journal of a staging directory (``run_key``, ``state``, ...), or ``None``.

    An unreadable journal raises :class:`StagingConflict`: it is not silently treated as absent.
    """
    path = Path(staging_dir) / JOURNAL_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        journal = json.loads(text)
        if not isinstance(journal, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise StagingConflict(f"{path} is unreadable ({exc}); rerun with --restart to discard the staged progress") from None
    return journal


class DatasetWriter:
    """Collects captured chunks per config, spills to staging, commits, resumes, writes final files.

    Memory bound (``T = flush_threshold_mb``, ``R = row_group_size``):

    * capture: buffered rows stay below ``T`` plus the last added chunk. The ``add``
      that crosses ``T`` spills every config into one part file, gathering one part
      batch at a time (no second copy of the buffer).
    * ``finalize()`` never loads a whole config. It splits each config, in sort order,
      into key ranges of at most ``T/2`` of rows (whole documents, or position ranges
      of a document larger than that), gathers a range from the part batches that
      overlap it (each at most ``T/8`` and 8192 rows) and sorts it into a second
      copy: at most ``T`` of rows at once. Row-group assembly adds fewer than ``2R``
      rows (carry-over and the group being written) plus the Parquet writer's buffer
      of one group; the part indexes (a few integers per config, part and document)
      and, while an oversized document is split, its positions are small. With the
      defaults (256 MB, 65536-row groups of 34 MB at head_dim 128) that is about
      ``T + 100 MB``. Only a single (document, position) key repeated over ``T/2``
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
        if flush_threshold_mb < 0:
            raise ValueError(f"flush_threshold_mb must be >= 0, got {flush_threshold_mb}")
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
        """Most rows the last ``finalize()`` held at once while sorting (a diagnostic)."""
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
        positions = _to_int32(chunk.positions, "position")
        buckets = _to_int32(chunk.buckets, "bucket")
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
                continue  # the config is still recorded, so finalize() writes an empty file
            # Copy: the caller may reuse its capture buffer after add() returns.
            rows = _Rows(ids64, positions, buckets, np.array(vectors[i], dtype=np.float32, copy=True), tokens)
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
        journal = json.loads((other / JOURNAL_FILE).read_text(encoding="utf-8"))
        for name, meta in journal["configs"].items():
            buf = self._buffers.setdefault(name, _ConfigBuffer(int(meta["head_dim"]), meta["sliding_window"]))
            if (buf.head_dim, buf.sliding_window) != (int(meta["head_dim"]), meta["sliding_window"]):
                raise ValueError(f"{other}: config {name} has head_dim/sliding_window that differ from this run's")
        self._ensure_staging()
        for part in journal["parts"]:
            target = self._staging / f"part-{self._next_part:06d}.arrow"
            target.unlink(missing_ok=True)
            os.link(other / part, target)
            self._next_part += 1
            self._uncommitted.append(target.name)

    # -- finishing ----------------------------------------------------------
    def finalize(self, target: Path | str) -> dict[str, ConfigStats]:
        """Write every config this run captured into ``target``; return each one's statistics.

        Each ``target/lXXhYY[qk]/data.parquet`` is written durably (temp file, fsync,
        rename). Staging is left as it is: the caller records the result with
        :meth:`commit`, then frees the parts with :meth:`drop_parts`.
        """
        self._check_open()
        self._spill()  # one code path: every row is read back from the parts
        slices = self._load_index()
        return {
            name: self._write_config(Path(target), name, self._buffers[name], slices.pop(name, []))
            for name in sorted(self._buffers)
        }

    def drop_parts(self) -> None:
        """Delete every part file once the committed state no longer needs them (after :meth:`finalize`).

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
        self._finish()
        if not (self._staging / JOURNAL_FILE).exists():
            self._remove_staging()
            return
        keep = {JOURNAL_FILE, *self._committed}
        for path in self._staging.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def discard(self) -> None:
        """Remove the staging directory entirely (committed state included)."""
        self._finish()
        self._remove_staging()

    # -- internals ----------------------------------------------------------
    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError("DatasetWriter is closed")

    def _finish(self) -> None:
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
        journal = {
            "format": _JOURNAL_FORMAT,
            "run_key": self.run_key,
            "parts": parts,
            "next_part": self._next_part,
            "configs": {
                name: {"head_dim": buf.head_dim, "sliding_window": buf.sliding_window}
                for name, buf in sorted(self._buffers.items())
            },
            "state": state,
        }
        write_text_durably(self._staging / JOURNAL_FILE, json.dumps(journal, indent=1, sort_keys=True))

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
        journal = read_journal(self._staging)
        assert journal is not None  # called only when the journal file exists
        try:
            parts, configs = list(journal["parts"]), dict(journal["configs"])
            ok = journal.get("format") == _JOURNAL_FORMAT
        except (KeyError, TypeError) as exc:
            raise StagingConflict(f"{self._staging} holds an unreadable journal (no {exc})") from exc
        staged_key, staged_state = journal.get("run_key"), journal.get("state")
        if not ok or self.run_key is None or staged_key != self.run_key:
            raise StagingConflict(
                f"{self._staging} holds an unfinished run whose configuration differs from this "
                f"one (run_key {staged_key!r}, this run {self.run_key!r})",
                staged_key,
                staged_state,
            )
        missing = [p for p in parts if not (self._staging / p).is_file()]
        if missing:
            raise StagingConflict(
                f"{self._staging} is incomplete (missing {', '.join(missing[:3])})", staged_key, staged_state
            )
        keep = {JOURNAL_FILE, *parts}
        for entry in self._staging.iterdir():  # parts written after the last commit, temp files
            if entry.name not in keep:
                remove_tree(entry) if entry.is_dir() else entry.unlink()
        self._committed = parts
        self._next_part = int(journal["next_part"])
        self._buffers = {
            name: _ConfigBuffer(int(meta["head_dim"]), meta["sliding_window"])
            for name, meta in configs.items()
        }
        self._resumed_state = journal["state"]

    def _part_batch_rows(self, head_dim: int) -> int:
        return max(1, min(_PART_BATCH_MAX_ROWS, self.flush_threshold_bytes // 8 // _row_bytes(head_dim)))

    def _spill(self) -> None:
        """Write every non-empty buffer into ONE new part file and free the memory."""
        names = sorted(name for name, buf in self._buffers.items() if buf.pending)
        if not names:
            return
        # Pass 1, cheap columns only: sort each config and index the batches (the
        # index goes in the schema, which the IPC file writes first). Sorted runs let
        # finalize() fetch only the batches overlapping a key range.
        plans = []
        index: list[dict[str, Any]] = []
        n_batches = 0
        for name in names:
            buf = self._buffers[name]
            order, ids64, positions, buckets = _sorted_columns(buf.pending)
            step = self._part_batch_rows(buf.head_dim)
            starts = range(0, len(order), step)
            bounds = [
                [*_key(ids64, positions, s), *_key(ids64, positions, min(s + step, len(order)) - 1)] for s in starts
            ]
            ids, counts = np.unique(ids64, return_counts=True)
            index.append(
                {"config": name, "first_batch": n_batches, "keys": bounds, "ids": ids.tolist(), "counts": counts.tolist()}
            )
            plans.append((buf, order, ids64, positions, buckets, starts))
            n_batches += len(bounds)
        schema = _part_schema(self.token_strings).with_metadata({_INDEX_KEY: json.dumps(index, separators=(",", ":"))})

        def write(tmp: Path) -> None:
            # Pass 2: gather each batch's vectors in sorted order and write it at once,
            # so a spill holds the buffered rows plus one batch, never a second copy.
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema, options=_IPC_OPTS) as out:
                for buf, order, ids64, positions, buckets, starts in plans:
                    vectors = [r.vectors for r in buf.pending]
                    tokens = np.concatenate([r.tokens for r in buf.pending]) if self.token_strings else None
                    for s in starts:
                        sl = slice(s, s + starts.step)
                        gathered = _gather(vectors, order[sl], buf.head_dim)
                        text = None if tokens is None else tokens[order[sl]]
                        out.write_batch(_part_batch(_Rows(ids64[sl], positions[sl], buckets[sl], gathered, text)))

        self._ensure_staging()
        name = f"part-{self._next_part:06d}.arrow"
        write_durably(self._staging / name, write)
        for buf, *_ in plans:  # only now: a failed write loses nothing
            buf.pending, buf.nbytes = [], 0
        self._next_part += 1
        self._uncommitted.append(name)
        self._buffered = 0

    def _load_index(self) -> dict[str, list[_Slice]]:
        """Every config's slices, in part (= arrival) order."""
        slices: dict[str, list[_Slice]] = {}
        for part in self._committed + self._uncommitted:
            path = self._staging / part
            with pa.OSFile(str(path)) as src:
                index = json.loads(pa.ipc.open_file(src).schema.metadata[_INDEX_KEY])
            for entry in index:
                keys = [((k[0], k[1], k[2]), (k[3], k[4], k[5])) for k in entry["keys"]]
                slices.setdefault(entry["config"], []).append(
                    _Slice(
                        path,
                        entry["first_batch"],
                        keys,
                        np.asarray(entry["ids"], dtype=np.int64),
                        np.asarray(entry["counts"], dtype=np.int64),
                    )
                )
        return slices

    @staticmethod
    def _iter_range(slices: list[_Slice], lo: _Key, hi: _Key, head_dim: int) -> Iterator[_Rows]:
        """Rows with sort key in ``[lo, hi]``, one part batch at a time, in arrival order."""
        for sl in slices:
            wanted = [sl.first_batch + i for i, (first, last) in enumerate(sl.keys) if last >= lo and first <= hi]
            if not wanted:
                continue
            with pa.OSFile(str(sl.path)) as src:
                reader = pa.ipc.open_file(src)
                for b in wanted:
                    rows = _rows_from_batch(reader.get_batch(b), head_dim)
                    mask = rows.within(lo, hi)
                    yield rows if mask.all() else rows.take(mask)

    def _plan_ranges(self, slices: list[_Slice], budget: int, head_dim: int) -> list[tuple[_Key, _Key]]:
        """Consecutive key ranges of at most ``budget`` rows that cover the config in sort order."""
        if not slices:
            return []
        docs, inverse = np.unique(np.concatenate([s.ids for s in slices]), return_inverse=True)
        totals = np.zeros(len(docs), np.int64)
        np.add.at(totals, inverse, np.concatenate([s.counts for s in slices]))
        order = np.lexsort((docs, low32_ids(docs)))
        docs, totals = docs[order], totals[order]
        ranges: list[tuple[_Key, _Key]] = []
        for start, end in _pack(totals, budget):
            first, last = int(docs[start]), int(docs[end - 1])
            if end - start > 1 or totals[start] <= budget:
                ranges.append(((low32(first), first, _INT32_MIN), (low32(last), last, _INT32_MAX)))
                continue
            # One document larger than the budget: split it by position (reading positions only).
            k32 = low32(first)
            lo, hi = (k32, first, _INT32_MIN), (k32, first, _INT32_MAX)
            positions = np.concatenate([r.positions.copy() for r in self._iter_range(slices, lo, hi, head_dim)])
            values, counts = np.unique(positions, return_counts=True)
            for a, b in _pack(counts, budget):
                ranges.append(((k32, first, int(values[a])), (k32, first, int(values[b - 1]))))
        return ranges

    def _write_config(self, target: Path, name: str, buf: _ConfigBuffer, slices: list[_Slice]) -> ConfigStats:
        head_dim, group = buf.head_dim, self.row_group_size
        # Half the threshold per range: sorting makes a second copy of it.
        budget = max(1, self.flush_threshold_bytes // (2 * _row_bytes(head_dim)))
        total = 0
        nonfinite = 0
        buckets: Counter[int] = Counter()

        def emit(out: pq.ParquetWriter, rows: _Rows) -> None:
            nonlocal nonfinite
            # Each write_table call is exactly one row group, from contiguous arrays, so
            # row groups and pages never depend on how the rows were chunked.
            out.write_table(_final_table(rows, head_dim, buf.sliding_window))
            # Statistics come from the rows as written: the card never rereads the files.
            nonfinite += int(len(rows) - np.isfinite(rows.vectors).all(axis=1).sum())
            values, counts = np.unique(rows.buckets, return_counts=True)
            buckets.update(dict(zip(values.tolist(), counts.tolist())))

        def write(tmp: Path) -> None:
            nonlocal total
            schema = output_schema(head_dim, token_strings=self.token_strings)
            options = dict(_PARQUET_OPTS)
            if self.token_strings:
                options["use_dictionary"] = [*options["use_dictionary"], TOKEN_COLUMN]
            with pq.ParquetWriter(tmp, schema, **options) as out:
                carry = _Rows.concat([], head_dim, self.token_strings)  # < row_group_size rows awaiting their row group
                for lo, hi in self._plan_ranges(slices, budget, head_dim):
                    rows = _Rows.sorted_concat(
                        list(self._iter_range(slices, lo, hi, head_dim)), head_dim, self.token_strings
                    )
                    self._finalize_peak_rows = max(self._finalize_peak_rows, len(rows) + len(carry))
                    total += len(rows)
                    if len(carry):
                        need = group - len(carry)
                        carry = _Rows.concat([carry, rows.take(slice(0, need))], head_dim, self.token_strings)
                        rows = rows.take(slice(need, None))
                        if len(carry) < group:
                            continue
                        emit(out, carry)
                    full = len(rows) - len(rows) % group
                    for start in range(0, full, group):
                        emit(out, rows.take(slice(start, start + group)))
                    carry = rows.take(slice(full, None)).copy()  # copy: frees the range
                if len(carry) or total == 0:
                    emit(out, carry)  # a config with no rows still gets a file with the schema

        path = target / name / DATA_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, write)
        return ConfigStats(
            rows=total,
            bucket_counts=dict(sorted(buckets.items())),
            nonfinite_rows=nonfinite,
            head_dim=head_dim,
            sliding_window=buf.sliding_window,
            size=path.stat().st_size,
            sha256=sha256_file(path),
        )
