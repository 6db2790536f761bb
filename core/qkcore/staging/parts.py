"""Spill part files: every buffered config of one spill in one Arrow IPC file, sorted and indexed.

``part-NNNNNN.arrow`` (zstd) holds the configs of one spill in config-name order;
each config's rows are sorted (:mod:`.rows`) and cut into record batches, and the
file's schema metadata indexes them: the config, its first batch, the key range of
each batch and its per-document row counts. Sorted, indexed runs let the merge read
only the batches that overlap a key range (:func:`iter_range`).

IPC rather than Parquet because opening a file and fetching one batch is cheap
(Parquet footers with hundreds of row groups cost ~10 ms per open); zstd because
vectors upcast from bf16 compress about 2x.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from qkcore.layout import TOKEN_COLUMN, row_bytes
from qkcore.staging.rows import Key, Rows, gather, key_at, sorted_columns

_INDEX_KEY = b"qkcore.index"
_ID64 = "_example_id64"  # kept in parts only: the final sort needs the full id
_BATCH_MAX_ROWS = 8192  # small batches let the merge read only the key ranges it needs

# Configs may differ in head_dim, so the vector is a (large) variable-size list here.
_SCHEMA = pa.schema(
    [
        pa.field(_ID64, pa.int64()),
        pa.field("position", pa.int32()),
        pa.field("bucket", pa.int32()),
        pa.field("vector", pa.large_list(pa.float32())),
    ]
)
_IPC_OPTS = pa.ipc.IpcWriteOptions(compression="zstd")


def part_name(number: int) -> str:
    """File name of the ``number``-th part of a staging folder."""
    return f"part-{number:06d}.arrow"


@dataclass
class Slice:
    """One config's rows inside one part file: sorted batches and per-document counts."""

    path: Path
    first_batch: int
    keys: list[tuple[Key, Key]]  # (first, last) sort key of each batch
    ids: np.ndarray  # distinct 64-bit ids
    counts: np.ndarray  # rows per id


class Spill:
    """One part file to write: the buffered rows of every config, sorted and indexed.

    Built in two passes so a spill holds the buffered rows plus one batch, never a
    second copy: the constructor sorts the cheap columns and indexes the batches (the
    index goes in the schema, which the IPC file writes first); :meth:`write` gathers
    each batch's vectors in sorted order and writes it at once.
    """

    def __init__(self, configs: Sequence[tuple[str, int, Sequence[Rows]]], max_batch_bytes: int, tokens: bool) -> None:
        """``configs``: (name, head_dim, buffered rows) of each config, in config-name order."""
        self._plans = []
        index: list[dict[str, Any]] = []
        n_batches = 0
        for name, head_dim, pending in configs:
            order, ids64, positions, buckets = sorted_columns(pending)
            step = max(1, min(_BATCH_MAX_ROWS, max_batch_bytes // row_bytes(head_dim)))
            starts = range(0, len(order), step)
            bounds = [
                [*key_at(ids64, positions, s), *key_at(ids64, positions, min(s + step, len(order)) - 1)] for s in starts
            ]
            ids, counts = np.unique(ids64, return_counts=True)
            index.append(
                {"config": name, "first_batch": n_batches, "keys": bounds, "ids": ids.tolist(), "counts": counts.tolist()}
            )
            self._plans.append((head_dim, pending, order, ids64, positions, buckets, starts))
            n_batches += len(bounds)
        self._tokens = tokens
        self._schema = _schema(tokens).with_metadata({_INDEX_KEY: json.dumps(index, separators=(",", ":"))})

    def write(self, path: Path) -> None:
        """Write the part file at ``path`` (the caller makes it durable)."""
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, self._schema, options=_IPC_OPTS) as out:
            for head_dim, pending, order, ids64, positions, buckets, starts in self._plans:
                vectors = [r.vectors for r in pending]
                tokens = np.concatenate([r.tokens for r in pending]) if self._tokens else None
                for s in starts:
                    sl = slice(s, s + starts.step)
                    gathered = gather(vectors, order[sl], head_dim)
                    text = None if tokens is None else tokens[order[sl]]
                    out.write_batch(_batch(Rows(ids64[sl], positions[sl], buckets[sl], gathered, text)))


def load_index(paths: Sequence[Path]) -> dict[str, list[Slice]]:
    """Every config's slices in the part files ``paths``, in that (= arrival) order."""
    slices: dict[str, list[Slice]] = {}
    for path in paths:
        with pa.OSFile(str(path)) as src:
            index = json.loads(pa.ipc.open_file(src).schema.metadata[_INDEX_KEY])
        for entry in index:
            keys = [((k[0], k[1], k[2]), (k[3], k[4], k[5])) for k in entry["keys"]]
            slices.setdefault(entry["config"], []).append(
                Slice(
                    path,
                    entry["first_batch"],
                    keys,
                    np.asarray(entry["ids"], dtype=np.int64),
                    np.asarray(entry["counts"], dtype=np.int64),
                )
            )
    return slices


def iter_range(slices: Sequence[Slice], lo: Key, hi: Key, head_dim: int) -> Iterator[Rows]:
    """Rows with sort key in ``[lo, hi]``, one part batch at a time, in arrival order."""
    for sl in slices:
        wanted = [sl.first_batch + i for i, (first, last) in enumerate(sl.keys) if last >= lo and first <= hi]
        if not wanted:
            continue
        with pa.OSFile(str(sl.path)) as src:
            reader = pa.ipc.open_file(src)
            for b in wanted:
                rows = _rows(reader.get_batch(b), head_dim)
                mask = rows.within(lo, hi)
                yield rows if mask.all() else rows.take(mask)


def _schema(tokens: bool) -> pa.Schema:
    return _SCHEMA.append(pa.field(TOKEN_COLUMN, pa.large_string())) if tokens else _SCHEMA


def _batch(rows: Rows) -> pa.RecordBatch:
    n, head_dim = rows.vectors.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * head_dim)
    vec = pa.LargeListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(rows.vectors).reshape(-1)))
    cols = [pa.array(rows.ids64), pa.array(rows.positions), pa.array(rows.buckets), vec]
    if rows.tokens is not None:
        cols.append(pa.array(rows.tokens, type=pa.large_string()))
    return pa.RecordBatch.from_arrays(cols, schema=_schema(rows.tokens is not None))


def _rows(batch: pa.RecordBatch, head_dim: int) -> Rows:
    flat = batch.column(3).flatten().to_numpy(zero_copy_only=False)
    tokens = batch.column(4).to_numpy(zero_copy_only=False) if batch.num_columns > 4 else None
    return Rows(
        batch.column(0).to_numpy(zero_copy_only=False),
        batch.column(1).to_numpy(zero_copy_only=False),
        batch.column(2).to_numpy(zero_copy_only=False),
        flat.reshape(-1, head_dim),
        tokens,
    )
