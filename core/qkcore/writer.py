"""Buffered, spill-to-disk Parquet writer for captured query/key vectors.

Layout written under ``data_root``::

    lXXhYYq/data.parquet   queries of decoder layer XX, head YY
    lXXhYYk/data.parquet   keys of decoder layer XX, key head YY

Each file has exactly the columns ``bucket`` int32, ``example_id`` int32 (low 32
bits of the normalised 64-bit id), ``position`` int32, ``vector``
fixed_size_list<float32>[head_dim] and ``sliding_window`` int32 (nullable),
sorted stably by (64-bit example id, position) and zstd-compressed. The bytes
depend only on the rows (and their arrival order), not on how they were
chunked or spilled.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PARTS_DIR = ".qkcore-parts"
DATA_FILE = "data.parquet"
_ID64 = "_example_id64"  # extra column kept in part files only, for the final sort
_INT32_MIN, _INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)
_CONFIG_RE = re.compile(r"^l(\d{2,})h(\d{2,})([qk])$")

# Writer options shared by part and final files. No option here writes a
# timestamp; ``created_by`` only carries the pyarrow version, so output is
# reproducible for a given pyarrow.
_PARQUET_OPTS: dict = dict(
    compression="zstd",
    version="2.6",
    data_page_version="1.0",
    write_statistics=True,
    # Dictionary-encode only the small integer columns; float vectors never repeat.
    use_dictionary=["bucket", "example_id", "position", "sliding_window"],
    store_schema=True,  # keeps fixed_size_list (not plain list) on read-back
)


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


def config_name(layer: int, head: int, kind: str) -> str:
    """Return the config name for a (layer, head, kind), e.g. ``l03h07q``."""
    if kind not in ("q", "k"):
        raise ValueError(f"kind must be 'q' or 'k', got {kind!r}")
    if layer < 0 or head < 0:
        raise ValueError(f"layer and head must be non-negative, got {layer}, {head}")
    return f"l{layer:02d}h{head:02d}{kind}"


def parse_config_name(name: str) -> tuple[int, int, str] | None:
    """Parse ``lXXhYY[qk]`` into ``(layer, head, kind)``; ``None`` if not canonical."""
    m = _CONFIG_RE.match(name)
    if m is None:
        return None
    layer, head, kind = int(m.group(1)), int(m.group(2)), m.group(3)
    # Reject non-canonical spellings (e.g. "l003h01q") so one config has one name.
    return (layer, head, kind) if config_name(layer, head, kind) == name else None


def output_schema(head_dim: int) -> pa.Schema:
    """Schema of a final ``data.parquet`` file for vectors of ``head_dim``."""
    return pa.schema(
        [
            pa.field("bucket", pa.int32()),
            pa.field("example_id", pa.int32()),
            pa.field("position", pa.int32()),
            pa.field("vector", pa.list_(pa.float32(), head_dim)),
            pa.field("sliding_window", pa.int32()),
        ]
    )


def _part_schema(head_dim: int) -> pa.Schema:
    return output_schema(head_dim).append(pa.field(_ID64, pa.int64()))


def low32_ids(ids: np.ndarray) -> np.ndarray:
    """Low 32 bits of int64 ids, reinterpreted as signed int32 (two's complement)."""
    return (np.asarray(ids, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


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
class _ConfigBuffer:
    """In-memory rows and spilled parts of one config (layer, head, kind)."""

    head_dim: int
    sliding_window: int | None
    ids64: list[np.ndarray] = field(default_factory=list)
    positions: list[np.ndarray] = field(default_factory=list)  # int32
    buckets: list[np.ndarray] = field(default_factory=list)  # int32
    vectors: list[np.ndarray] = field(default_factory=list)  # float32 (n, head_dim)
    parts: list[Path] = field(default_factory=list)
    nbytes: int = 0

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Concatenate and clear the in-memory rows."""
        out = (
            np.concatenate(self.ids64) if self.ids64 else np.empty(0, np.int64),
            np.concatenate(self.positions) if self.positions else np.empty(0, np.int32),
            np.concatenate(self.buckets) if self.buckets else np.empty(0, np.int32),
            np.concatenate(self.vectors)
            if self.vectors
            else np.empty((0, self.head_dim), np.float32),
        )
        self.ids64, self.positions, self.buckets, self.vectors = [], [], [], []
        self.nbytes = 0
        return out


def _build_table(
    buf: _ConfigBuffer,
    ids64: np.ndarray,
    positions: np.ndarray,
    buckets: np.ndarray,
    vectors: np.ndarray,
    *,
    with_id64: bool,
) -> pa.Table:
    n = len(ids64)
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    vec = pa.FixedSizeListArray.from_arrays(flat, buf.head_dim)
    sw = pa.nulls(n, pa.int32()) if buf.sliding_window is None else pa.array(
        np.full(n, buf.sliding_window, dtype=np.int32)
    )
    cols = [pa.array(buckets), pa.array(low32_ids(ids64)), pa.array(positions), vec, sw]
    schema = output_schema(buf.head_dim)
    if with_id64:
        cols.append(pa.array(ids64))
        schema = _part_schema(buf.head_dim)
    return pa.Table.from_arrays(cols, schema=schema)


class DatasetWriter:
    """Collects captured chunks per config, spills under memory pressure, writes final files.

    Host memory stays bounded by ``flush_threshold_mb`` during capture; ``close``
    then materialises one config at a time (its rows must fit in RAM once).
    """

    def __init__(
        self,
        data_root: Path,
        *,
        flush_threshold_mb: float = 256.0,
        row_group_size: int | None = None,
    ) -> None:
        self.data_root = Path(data_root)
        self.flush_threshold_bytes = int(flush_threshold_mb * 1024 * 1024)
        self.row_group_size = row_group_size
        self._parts_root = self.data_root / PARTS_DIR
        self._buffers: dict[str, _ConfigBuffer] = {}
        self._buffered = 0
        self._part_counter = 0
        self._closed = False
        # Parts left by a crashed run are never valid input to this run.
        if self._parts_root.exists():
            shutil.rmtree(self._parts_root)

    def add(self, chunk: CapturedChunk) -> None:
        """Split ``chunk`` per head into config buffers; spill if over the threshold."""
        if self._closed:
            raise RuntimeError("DatasetWriter is closed")
        vectors = np.asarray(chunk.vectors)
        if vectors.ndim != 3 or vectors.shape[0] != len(chunk.heads):
            raise ValueError(
                f"vectors must be (len(heads)={len(chunk.heads)}, n, head_dim), got {vectors.shape}"
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
                continue  # the config is still recorded, so close() writes an empty file
            # Copy: the caller may reuse its capture buffer after add() returns.
            vec = np.array(vectors[i], dtype=np.float32, copy=True)
            buf.ids64.append(ids64)
            buf.positions.append(positions)
            buf.buckets.append(buckets)
            buf.vectors.append(vec)
            added = ids64.nbytes + positions.nbytes + buckets.nbytes + vec.nbytes
            buf.nbytes += added
            self._buffered += added
        if self._buffered > self.flush_threshold_bytes:
            self._spill()

    def buffered_bytes(self) -> int:
        """Bytes currently held in memory (not yet spilled)."""
        return self._buffered

    def _spill(self) -> None:
        """Write every non-empty buffer to a new part file and free the memory."""
        for name, buf in self._buffers.items():
            if buf.nbytes == 0:
                continue
            table = _build_table(buf, *buf.take(), with_id64=True)
            part_dir = self._parts_root / name
            part_dir.mkdir(parents=True, exist_ok=True)
            final = part_dir / f"part-{self._part_counter:06d}.parquet"
            tmp = part_dir / f".{final.name}.tmp"
            pq.write_table(table, tmp, **_PARQUET_OPTS)
            os.replace(tmp, final)  # a part is either complete or absent
            buf.parts.append(final)
        self._part_counter += 1
        self._buffered = 0

    def close(self) -> dict[str, int]:
        """Write every captured config's ``data.parquet``; return rows written per config."""
        if self._closed:
            raise RuntimeError("DatasetWriter is closed")
        written: dict[str, int] = {}
        for name in sorted(self._buffers):
            buf = self._buffers[name]
            written[name] = self._write_config(name, buf)
            self._buffers[name] = _ConfigBuffer(buf.head_dim, buf.sliding_window)  # free RAM
        self._buffered = 0
        self._closed = True
        shutil.rmtree(self._parts_root, ignore_errors=True)
        return written

    def _write_config(self, name: str, buf: _ConfigBuffer) -> int:
        pieces = [pq.read_table(p, schema=_part_schema(buf.head_dim)) for p in buf.parts]
        pieces.append(_build_table(buf, *buf.take(), with_id64=True))
        table = pa.concat_tables(pieces).combine_chunks()
        ids64 = table.column(_ID64).to_numpy()
        positions = table.column("position").to_numpy()
        # lexsort is stable: equal (id, position) keep their arrival order.
        order = np.lexsort((positions, ids64))
        table = table.take(pa.array(order)).drop_columns([_ID64]).combine_chunks()
        out_dir = self.data_root / name
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{DATA_FILE}.tmp"
        try:
            pq.write_table(
                table,
                tmp,
                row_group_size=self.row_group_size,
                **_PARQUET_OPTS,
            )
            os.replace(tmp, out_dir / DATA_FILE)  # replaces an older run's file atomically
        finally:
            if tmp.exists():
                tmp.unlink()
        return table.num_rows

    def abort(self) -> None:
        """Drop buffered rows and this run's part/temp files; final files are untouched."""
        for name in self._buffers:
            tmp = self.data_root / name / f".{DATA_FILE}.tmp"
            if tmp.exists():
                tmp.unlink()
        self._buffers.clear()
        self._buffered = 0
        self._closed = True
        shutil.rmtree(self._parts_root, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close on success, abort on error, so a failed run leaves no partial output."""
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()
