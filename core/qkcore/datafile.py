"""One config's final ``data.parquet``: how it is written, what is counted while writing it, reading it back.

Each final file has exactly the columns of :func:`qkcore.layout.output_schema`:
``bucket`` int32, ``example_id`` int32 (low 32 bits of the normalised 64-bit id,
signed), ``position`` int32, ``vector`` fixed_size_list<float32>[head_dim] and
``sliding_window`` int32 (nullable), plus ``token_str`` when captured. It is
zstd-compressed and its rows arrive sorted (:mod:`qkcore.staging.merge`). Row groups
hold exactly ``row_group_size`` rows (the last one fewer), so the bytes depend only on
the rows and their order, never on how they were chunked (same pyarrow).

For the Hub's dataset viewer, every file carries a page index (column and offset
indexes: the viewer reads a large file only with one) and no row group holds more
than :data:`VIEWER_ROW_GROUP_BYTES` of uncompressed rows (the viewer refuses row
groups above about 286 MiB, 300 MB).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qkcore.fsutil import sha256_file, write_durably
from qkcore.layout import DATA_FILE, TOKEN_COLUMN, low32_ids, output_schema
from qkcore.staging.rows import Rows

#: Rows per row group unless the run sets ``output.write_batch_size``.
DEFAULT_ROW_GROUP_SIZE = 65536
#: Most uncompressed bytes of rows in one row group: half the Hub dataset viewer's limit
#: (300,000,000 bytes), well inside its recommended 100-300 MB.
VIEWER_ROW_GROUP_BYTES = 128 * 2**20
#: Uncompressed bytes a ``token_str`` value is assumed to take (tokens are short strings).
_TOKEN_BYTES = 32

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
    write_page_index=True,  # the Hub's dataset viewer reads large files only with a page index
)


def viewer_row_group_size(requested: int, head_dim: int, token_strings: bool) -> int:
    """``requested`` rows per row group, lowered so a row group stays within :data:`VIEWER_ROW_GROUP_BYTES`.

    A row is the float32 vector plus four int32 columns (and a short ``token_str``).
    """
    row_bytes = head_dim * 4 + 4 * 4 + (_TOKEN_BYTES if token_strings else 0)
    return max(1, min(requested, VIEWER_ROW_GROUP_BYTES // row_bytes))


@dataclass(frozen=True)
class ConfigStats:
    """What was written for one config (:func:`write_data_file`, published in ``qkcore.json``)."""

    rows: int
    bucket_counts: dict[int, int]  # bucket -> rows
    nonfinite_rows: int  # rows whose vector holds a NaN or an infinity
    head_dim: int
    sliding_window: int | None
    size: int  # bytes of data.parquet
    sha256: str  # of data.parquet


def write_data_file(
    path: Path,
    runs: Iterable[Rows],
    *,
    head_dim: int,
    sliding_window: int | None,
    row_group_size: int,
    token_strings: bool,
) -> tuple[ConfigStats, int]:
    """Write the sorted ``runs`` (consecutive, in order) as ``path``, durably; return its statistics.

    Also returns the most rows held at once (a run plus the carry-over of a row group),
    a diagnostic of the memory bound. Statistics come from the rows as written: the
    card never rereads the files.
    """
    group = viewer_row_group_size(row_group_size, head_dim, token_strings)
    total = 0
    peak = 0
    nonfinite = 0
    buckets: Counter[int] = Counter()

    def emit(out: pq.ParquetWriter, rows: Rows) -> None:
        nonlocal nonfinite
        # Each write_table call is exactly one row group, from contiguous arrays, so
        # row groups and pages never depend on how the rows were chunked.
        out.write_table(_table(rows, head_dim, sliding_window))
        nonfinite += int(len(rows) - np.isfinite(rows.vectors).all(axis=1).sum())
        values, counts = np.unique(rows.buckets, return_counts=True)
        buckets.update(dict(zip(values.tolist(), counts.tolist())))

    def write(tmp: Path) -> None:
        nonlocal total, peak
        schema = output_schema(head_dim, token_strings=token_strings)
        options = dict(_PARQUET_OPTS)
        if token_strings:
            options["use_dictionary"] = [*options["use_dictionary"], TOKEN_COLUMN]
        with pq.ParquetWriter(tmp, schema, **options) as out:
            carry = Rows.concat([], head_dim, token_strings)  # < row_group_size rows awaiting their row group
            for rows in runs:
                peak = max(peak, len(rows) + len(carry))
                total += len(rows)
                if len(carry):
                    need = group - len(carry)
                    carry = Rows.concat([carry, rows.take(slice(0, need))], head_dim, token_strings)
                    rows = rows.take(slice(need, None))
                    if len(carry) < group:
                        continue
                    emit(out, carry)
                full = len(rows) - len(rows) % group
                for start in range(0, full, group):
                    emit(out, rows.take(slice(start, start + group)))
                carry = rows.take(slice(full, None)).copy()  # copy: frees the run
            if len(carry) or total == 0:
                emit(out, carry)  # a config with no rows still gets a file with the schema

    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, write)
    stats = ConfigStats(
        rows=total,
        bucket_counts=dict(sorted(buckets.items())),
        nonfinite_rows=nonfinite,
        head_dim=head_dim,
        sliding_window=sliding_window,
        size=path.stat().st_size,
        sha256=sha256_file(path),
    )
    return stats, peak


def read_config(path: Path | str) -> pa.Table:
    """Read one config (its directory or its ``data.parquet``) as a pyarrow Table."""
    path = Path(path)
    if path.is_dir():
        path = path / DATA_FILE
    return pq.read_table(path)


def _table(rows: Rows, head_dim: int, sliding_window: int | None) -> pa.Table:
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
