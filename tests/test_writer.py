"""Tests for qkcore.writer: schema, id conversion, sorting, spilling, replacement, atomicity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkcore.writer import (
    PARTS_DIR,
    CapturedChunk,
    DatasetWriter,
    config_name,
    low32_ids,
    parse_config_name,
    read_config,
)

HEAD_DIM = 4


def make_rows(n: int, heads: int = 2, seed: int = 0) -> dict:
    """Random rows with repeated (id, position) pairs so stability matters."""
    rng = np.random.default_rng(seed)
    return dict(
        example_ids=rng.choice(np.array([5, -3, 2**40 + 7, 2**31 + 1, 0], np.int64), n),
        positions=rng.integers(0, 6, n).astype(np.int64),
        buckets=rng.integers(0, 3, n).astype(np.int64),
        vectors=rng.standard_normal((heads, n, HEAD_DIM)).astype(np.float32),
    )


def chunk(rows: dict, lo: int, hi: int, *, layer=0, kind="q", heads=(0, 1), sw=None):
    return CapturedChunk(
        layer=layer,
        kind=kind,
        heads=list(heads),
        example_ids=rows["example_ids"][lo:hi],
        positions=rows["positions"][lo:hi],
        buckets=rows["buckets"][lo:hi],
        vectors=rows["vectors"][:, lo:hi],
        sliding_window=sw,
    )


def write(root: Path, rows: dict, cuts: list[int], **kw) -> dict[str, int]:
    w = DatasetWriter(root, **kw)
    bounds = [0, *sorted(cuts), len(rows["positions"])]
    for lo, hi in zip(bounds, bounds[1:]):
        w.add(chunk(rows, lo, hi))
    return w.close()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_config_names():
    assert config_name(3, 7, "q") == "l03h07q"
    assert config_name(120, 5, "k") == "l120h05k"
    assert parse_config_name("l03h07q") == (3, 7, "q")
    assert parse_config_name("l120h05k") == (120, 5, "k")
    for bad in ("l3h07q", "l03h07x", "l003h07q", "foo", "l03h07q.tmp"):
        assert parse_config_name(bad) is None
    with pytest.raises(ValueError):
        config_name(0, 0, "v")


def test_schema_exact(tmp_path):
    rows = make_rows(10)
    write(tmp_path, rows, [4])
    path = tmp_path / "l00h00q" / "data.parquet"
    schema = pq.read_schema(path)
    assert schema.names == ["bucket", "example_id", "position", "vector", "sliding_window"]
    assert schema.field("bucket").type == pa.int32()
    assert schema.field("example_id").type == pa.int32()
    assert schema.field("position").type == pa.int32()
    assert schema.field("vector").type == pa.list_(pa.float32(), HEAD_DIM)
    assert pa.types.is_fixed_size_list(schema.field("vector").type)
    sw = schema.field("sliding_window")
    assert sw.type == pa.int32() and sw.nullable
    table = read_config(tmp_path / "l00h00q")
    assert table.column("sliding_window").null_count == 10
    meta = pq.ParquetFile(path).metadata
    assert all(
        meta.row_group(0).column(i).compression == "ZSTD" for i in range(meta.num_columns)
    )


def test_sliding_window_value_and_conflict(tmp_path):
    rows = make_rows(6)
    w = DatasetWriter(tmp_path)
    w.add(chunk(rows, 0, 3, sw=128))
    with pytest.raises(ValueError, match="sliding_window"):
        w.add(chunk(rows, 3, 6, sw=64))
    w.close()
    assert read_config(tmp_path / "l00h01q").column("sliding_window").to_pylist() == [128] * 3


def test_low32_ids():
    ids = np.array([0, 1, -1, 2**31, 2**31 + 5, 2**32 + 3, -(2**40) - 2, 2**63 - 1], np.int64)
    out = low32_ids(ids)
    assert out.dtype == np.int32
    expected = [((int(i) & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000 for i in ids]
    assert out.tolist() == expected
    assert out.tolist()[:6] == [0, 1, -1, -(2**31), -(2**31) + 5, 3]


def test_example_id_column_and_sort(tmp_path):
    rows = make_rows(40, seed=3)
    write(tmp_path, rows, [7, 19])
    for h in (0, 1):
        t = read_config(tmp_path / f"l00h0{h}q")
        order = np.lexsort((rows["positions"], rows["example_ids"]))  # stable
        assert t.column("example_id").to_pylist() == low32_ids(rows["example_ids"][order]).tolist()
        assert t.column("position").to_pylist() == rows["positions"][order].tolist()
        assert t.column("bucket").to_pylist() == rows["buckets"][order].tolist()
        got = np.asarray(t.column("vector").combine_chunks().flatten()).reshape(-1, HEAD_DIM)
        np.testing.assert_array_equal(got, rows["vectors"][h][order])


def test_position_out_of_int32_raises(tmp_path):
    rows = make_rows(3)
    rows["positions"][1] = 2**31
    w = DatasetWriter(tmp_path)
    with pytest.raises(ValueError, match="position"):
        w.add(chunk(rows, 0, 3))
    w.abort()


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cuts=st.lists(st.integers(0, 60), max_size=6),
    threshold=st.sampled_from([0.0, 0.0005, 0.002]),
)
def test_spill_and_chunking_give_identical_bytes(tmp_path_factory, cuts, threshold):
    rows = make_rows(60, seed=1)
    ref = tmp_path_factory.mktemp("ref")
    write(ref, rows, [], flush_threshold_mb=1024)
    other = tmp_path_factory.mktemp("spill")
    write(other, rows, cuts, flush_threshold_mb=threshold)
    for name in ("l00h00q", "l00h01q"):
        assert digest(ref / name / "data.parquet") == digest(other / name / "data.parquet")
    assert not (other / PARTS_DIR).exists()


def test_spill_bounds_memory_and_writes_parts(tmp_path):
    rows = make_rows(50)
    w = DatasetWriter(tmp_path, flush_threshold_mb=0.001)
    for lo in range(0, 50, 10):
        w.add(chunk(rows, lo, lo + 10))
        assert w.buffered_bytes() <= 0.001 * 1024 * 1024
    parts = sorted((tmp_path / PARTS_DIR / "l00h00q").glob("part-*.parquet"))
    assert parts and parts[0].name == "part-000000.parquet"
    assert w.close() == {"l00h00q": 50, "l00h01q": 50}
    assert not (tmp_path / PARTS_DIR).exists()


def test_row_group_size(tmp_path):
    write(tmp_path, make_rows(25), [], row_group_size=10)
    assert pq.ParquetFile(tmp_path / "l00h00q" / "data.parquet").metadata.num_row_groups == 3


def test_replaces_captured_config_and_keeps_others(tmp_path):
    write(tmp_path, make_rows(10, seed=1), [])  # l00h00q, l00h01q
    other = tmp_path / "l00h01q" / "data.parquet"
    before_other = digest(other)
    rows = make_rows(4, heads=1, seed=2)
    w = DatasetWriter(tmp_path)
    w.add(chunk(rows, 0, 4, heads=(0,)))
    assert w.close() == {"l00h00q": 4}
    assert read_config(tmp_path / "l00h00q").num_rows == 4
    assert digest(other) == before_other


def test_zero_row_config(tmp_path):
    rows = make_rows(0)
    w = DatasetWriter(tmp_path)
    w.add(chunk(rows, 0, 0, layer=2, kind="k", heads=(3, 4)))
    assert w.close() == {"l02h03k": 0, "l02h04k": 0}
    t = read_config(tmp_path / "l02h03k")
    assert t.num_rows == 0
    assert t.schema.field("vector").type == pa.list_(pa.float32(), HEAD_DIM)
    assert t.schema.field("sliding_window").type == pa.int32()


def test_abort_leaves_final_files(tmp_path):
    write(tmp_path, make_rows(10), [])
    before = digest(tmp_path / "l00h00q" / "data.parquet")
    w = DatasetWriter(tmp_path, flush_threshold_mb=0.0)
    w.add(chunk(make_rows(5, seed=9), 0, 5))
    w.add(chunk(make_rows(5, seed=9), 0, 5, layer=1))
    assert (tmp_path / PARTS_DIR).exists()
    w.abort()
    assert not (tmp_path / PARTS_DIR).exists()
    assert digest(tmp_path / "l00h00q" / "data.parquet") == before
    assert not (tmp_path / "l01h00q").exists()


def test_context_manager_aborts_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with DatasetWriter(tmp_path, flush_threshold_mb=0.0) as w:
            w.add(chunk(make_rows(5), 0, 5))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_no_temp_files_left(tmp_path):
    write(tmp_path, make_rows(30), [10, 20], flush_threshold_mb=0.0)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".") or "tmp" in p.name]
    assert leftovers == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l00h00q", "l00h01q"]
    assert sorted(p.name for p in (tmp_path / "l00h00q").iterdir()) == ["data.parquet"]


def test_stale_parts_from_crashed_run_are_ignored(tmp_path):
    stale = tmp_path / PARTS_DIR / "l00h00q"
    stale.mkdir(parents=True)
    (stale / "part-000000.parquet").write_bytes(b"garbage")
    assert write(tmp_path, make_rows(5), []) == {"l00h00q": 5, "l00h01q": 5}
    assert not (tmp_path / PARTS_DIR).exists()
