"""Tests for qkcore.writer: schema, ids, sort order, spilling, commit/resume, bounded close, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkcore.datafile import read_config
from qkcore.layout import config_name, low32_ids, parse_config_name
from qkcore.writer import JOURNAL_FILE, CapturedChunk, DatasetWriter, StagingConflict

HEAD_DIM = 4
CONFIGS = ("l00h00q", "l00h01q")
STAGING_DIR = "staging"  # where these tests stage, inside the folder that receives the final files


def close(w: DatasetWriter, target: Path) -> dict[str, int]:
    """Finalize into ``target`` and remove staging; return rows per config."""
    stats = w.write_final_files(target)
    w.discard()
    return {name: s.rows for name, s in stats.items()}


def make_rows(n: int, heads: int = 2, seed: int = 0, head_dim: int = HEAD_DIM) -> dict:
    """Random rows with repeated (id, position) pairs so stability matters; 5 and 2**32+5 collide in int32."""
    rng = np.random.default_rng(seed)
    return dict(
        example_ids=rng.choice(np.array([5, -3, 2**40 + 7, 2**31 + 1, 0, 2**32 + 5], np.int64), n),
        positions=rng.integers(0, 6, n).astype(np.int64),
        buckets=rng.integers(0, 3, n).astype(np.int64),
        vectors=rng.standard_normal((heads, n, head_dim)).astype(np.float32),
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


#: One byte: every add spills (a threshold must be > 0, as output.flush_threshold_mb is).
EVERY_ADD = 1 / 2**20


def write(root: Path, rows: dict, cuts: list[int], commits: frozenset[int] = frozenset(), **kw) -> dict[str, int]:
    """Add ``rows`` in chunks split at ``cuts``, committing after the chunks whose index is in ``commits``."""
    w = DatasetWriter(root / STAGING_DIR, **kw)
    bounds = [0, *sorted(cuts), len(rows["positions"])]
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        w.add(chunk(rows, lo, hi))
        if i in commits:
            w.commit({"chunks": i + 1})
    return close(w, root)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def digests(root: Path) -> dict[str, str]:
    return {p.parent.name: digest(p) for p in sorted(root.glob("*/data.parquet"))}


def staged_parts(root: Path) -> list[str]:
    return sorted(p.name for p in (root / STAGING_DIR).glob("part-*.arrow"))


def journal(root: Path) -> dict:
    return json.loads((root / STAGING_DIR / JOURNAL_FILE).read_text())


# Documents for the resume tests: defined as source so the killed child process runs the same code.
DOC_SRC = textwrap.dedent(
    """
    import numpy as np
    from qkcore.writer import CapturedChunk

    def doc_chunks(d, head_dim=4):
        # Three chunks per document (two kinds, layers 0/1); ids of docs 0 and 4 collide in int32.
        rng = np.random.default_rng(100 + d)
        doc_id = np.int64([2**33 + 9, -11, 2**40 + 3, 17, 9, 2**31 + 2][d % 6] + (d // 6) * 1000)
        n = 6 + d % 4
        out = []
        for layer, kind, heads in ((0, "q", [0, 1, 2]), (0, "k", [0]), (1, "q", [1])):
            out.append(CapturedChunk(
                layer=layer, kind=kind, heads=heads,
                example_ids=np.full(n, doc_id, np.int64),
                positions=np.arange(n, dtype=np.int64)[::-1].copy(),
                buckets=rng.integers(0, 3, n).astype(np.int64),
                vectors=rng.standard_normal((len(heads), n, head_dim)).astype(np.float32),
                sliding_window=None if layer == 0 else 32,
            ))
        return out
    """
)
_doc_ns: dict = {}
exec(DOC_SRC, _doc_ns)
doc_chunks = _doc_ns["doc_chunks"]
N_DOCS = 8


def write_docs(root: Path, docs: range, **kw) -> dict[str, int]:
    w = DatasetWriter(root / STAGING_DIR, **kw)
    for d in docs:
        for c in doc_chunks(d):
            w.add(c)
    return close(w, root)


# -- names, schema, ids ------------------------------------------------------


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
    w = DatasetWriter(tmp_path / STAGING_DIR)
    w.add(chunk(rows, 0, 3, sw=128))
    with pytest.raises(ValueError, match="sliding_window"):
        w.add(chunk(rows, 3, 6, sw=64))
    close(w, tmp_path)
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
    write(tmp_path, rows, [7, 19], flush_threshold_mb=EVERY_ADD)
    ids = rows["example_ids"]
    order = np.lexsort((rows["positions"], ids, low32_ids(ids)))  # stable: documented order
    for h in (0, 1):
        t = read_config(tmp_path / f"l00h0{h}q")
        assert t.column("example_id").to_pylist() == low32_ids(ids[order]).tolist()
        assert t.column("position").to_pylist() == rows["positions"][order].tolist()
        assert t.column("bucket").to_pylist() == rows["buckets"][order].tolist()
        got = np.asarray(t.column("vector").combine_chunks().flatten()).reshape(-1, HEAD_DIM)
        np.testing.assert_array_equal(got, rows["vectors"][h][order])


def test_sort_order_with_int32_collision(tmp_path):
    # 2**32+5 and 5 share example_id 5; 2**32-3 and -3 share -3. Arrival interleaves them.
    ids = np.array([2**32 + 5, 5, 2**32 + 5, -3, 5, 2**32 - 3, 7, -3], np.int64)
    pos = np.array([1, 1, 0, 2, 0, 0, 0, 1], np.int64)
    rows = dict(
        example_ids=ids,
        positions=pos,
        buckets=np.arange(8, dtype=np.int64),
        vectors=np.zeros((2, 8, HEAD_DIM), np.float32),
    )
    write(tmp_path, rows, [3, 5], flush_threshold_mb=EVERY_ADD)
    t = read_config(tmp_path / "l00h00q")
    assert t.column("example_id").to_pylist() == [-3, -3, -3, 5, 5, 5, 5, 7]  # visible column sorted
    # Within one int32 value, by 64-bit id (documents stay contiguous), then position.
    assert t.column("bucket").to_pylist() == [7, 3, 5, 4, 1, 2, 0, 6]
    assert t.column("position").to_pylist() == [1, 2, 0, 0, 1, 0, 1, 0]


def test_position_out_of_int32_raises(tmp_path):
    rows = make_rows(3)
    rows["positions"][1] = 2**31
    w = DatasetWriter(tmp_path / STAGING_DIR)
    with pytest.raises(ValueError, match="position"):
        w.add(chunk(rows, 0, 3))
    w.abort()


# -- determinism, spilling, part layout --------------------------------------


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    cuts=st.lists(st.integers(0, 60), max_size=6),
    threshold=st.sampled_from([EVERY_ADD, 0.0005, 0.002]),
    commits=st.frozensets(st.integers(0, 6), max_size=4),
)
def test_spill_chunking_and_commits_give_identical_bytes(tmp_path_factory, cuts, threshold, commits):
    rows = make_rows(60, seed=1)
    ref = tmp_path_factory.mktemp("ref")
    write(ref, rows, [], flush_threshold_mb=1024, row_group_size=16)
    other = tmp_path_factory.mktemp("spill")
    write(other, rows, cuts, commits, flush_threshold_mb=threshold, row_group_size=16, run_key="k")
    assert digests(ref) == digests(other) and set(digests(ref)) == set(CONFIGS)
    assert not (other / STAGING_DIR).exists()


def test_spill_bounds_memory_and_writes_parts(tmp_path):
    rows = make_rows(50)
    w = DatasetWriter(tmp_path / STAGING_DIR, flush_threshold_mb=0.001)
    for lo in range(0, 50, 10):
        w.add(chunk(rows, lo, lo + 10))
        assert w.buffered_bytes() <= 0.001 * 1024 * 1024
    assert staged_parts(tmp_path)[0] == "part-000000.arrow"
    assert close(w, tmp_path) == {"l00h00q": 50, "l00h01q": 50}
    assert not (tmp_path / STAGING_DIR).exists()


def test_part_files_scale_with_spills_not_configs(tmp_path):
    rows = make_rows(60, heads=20, seed=4)
    heads = tuple(range(20))
    w = DatasetWriter(tmp_path / STAGING_DIR, flush_threshold_mb=0.005, run_key="k")  # every add (6.4 kB) spills
    for i, lo in enumerate(range(0, 60, 10)):
        w.add(chunk(rows, lo, lo + 10, heads=heads))
        w.add(chunk(rows, lo, lo + 10, heads=heads, kind="k"))
        if i % 2:
            w.commit({"i": i})
    assert len(staged_parts(tmp_path)) == 12  # one per spill, not 12 x 40 configs
    assert len(close(w, tmp_path)) == 40


def test_row_group_size(tmp_path):
    write(tmp_path, make_rows(25), [], row_group_size=10)
    assert pq.ParquetFile(tmp_path / "l00h00q" / "data.parquet").metadata.num_row_groups == 3
    write(tmp_path / "default", make_rows(25), [3], flush_threshold_mb=EVERY_ADD)
    assert pq.ParquetFile(tmp_path / "default" / "l00h00q" / "data.parquet").metadata.num_row_groups == 1


def test_final_files_carry_a_page_index_for_the_hub_viewer(tmp_path):
    # The Hub's dataset viewer reads a large Parquet file only when it has a page index.
    write(tmp_path, make_rows(25), [], row_group_size=10)
    meta = pq.ParquetFile(tmp_path / "l00h00q" / "data.parquet").metadata
    chunks = [meta.row_group(g).column(c) for g in range(meta.num_row_groups) for c in range(meta.num_columns)]
    assert chunks and all(c.has_offset_index and c.has_column_index for c in chunks)
    again = tmp_path / "again"
    write(again, make_rows(25), [7], row_group_size=10)
    assert digests(again) == digests(tmp_path)  # the index is as deterministic as the rest


def test_row_groups_stay_within_the_hub_viewers_limit(tmp_path, monkeypatch):
    import qkcore.datafile as datafile

    # At real sizes: 65,536 rows of head_dim 128 (35 MB) are kept; any larger request is cut to half the limit.
    assert datafile.viewer_row_group_size(65536, 128, False) == 65536
    assert datafile.viewer_row_group_size(10**9, 128, True) * (128 * 4 + 16 + 32) <= 300_000_000 / 2
    # A row of head_dim 4 is 32 bytes: a 320-byte limit allows 10 rows per row group.
    monkeypatch.setattr(datafile, "VIEWER_ROW_GROUP_BYTES", 320)
    write(tmp_path, make_rows(25), [], row_group_size=1000)
    meta = pq.ParquetFile(tmp_path / "l00h00q" / "data.parquet").metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [10, 10, 5]


def test_close_memory_is_bounded_by_threshold(tmp_path):
    """One config far larger than the threshold (one document larger still) is sorted in bounded pieces."""
    head_dim, n = 64, 6000
    rng = np.random.default_rng(7)
    ids = rng.choice(np.array([3, 2**32 + 3, -8, 11], np.int64), n, p=[0.7, 0.1, 0.1, 0.1])
    rows = dict(
        example_ids=ids,
        positions=rng.permutation(n).astype(np.int64),  # document 3 alone holds ~4200 rows
        buckets=rng.integers(0, 3, n).astype(np.int64),
        vectors=rng.standard_normal((1, n, head_dim)).astype(np.float32),
    )
    total_bytes = n * (16 + 4 * head_dim)  # ~1.6 MB
    threshold_mb = 0.1
    budget = int(threshold_mb * 1024 * 1024) // (2 * (16 + 4 * head_dim))  # rows per range (~190)

    def run(root: Path, mb: float) -> DatasetWriter:
        w = DatasetWriter(root / STAGING_DIR, flush_threshold_mb=mb, row_group_size=100)
        for lo in range(0, n, 500):
            w.add(chunk(rows, lo, lo + 500, heads=(0,)))
        tracemalloc.start()
        close(w, root)
        w.peak = tracemalloc.get_traced_memory()[1]  # type: ignore[attr-defined]
        tracemalloc.stop()
        w.root = root  # type: ignore[attr-defined]
        return w

    small = run(tmp_path / "small", threshold_mb)
    big = run(tmp_path / "big", 1024)
    assert digests(small.root) == digests(big.root)
    assert read_config(small.root / "l00h00q").num_rows == n
    assert small.finalize_peak_rows <= budget + 100  # a range plus < one row group of carry
    assert big.finalize_peak_rows == n
    assert small.peak < total_bytes / 3  # type: ignore[attr-defined]


# -- commit, crash, resume ----------------------------------------------------


def test_commit_then_crash_resumes_identically(tmp_path):
    ref = tmp_path / "ref"
    write_docs(ref, range(N_DOCS))
    root = tmp_path / "run"
    w = DatasetWriter(root / STAGING_DIR, flush_threshold_mb=0.0006, run_key="run-A")
    for d in range(N_DOCS):
        for c in doc_chunks(d):
            w.add(c)
        if d == 3:
            w.commit({"documents_done": 4})
    committed = journal(root)["parts"]
    assert w.buffered_bytes() > 0 and len(staged_parts(root)) > len(committed)  # spilled + buffered after commit
    del w  # simulated crash: no close, no abort
    w2 = DatasetWriter(root / STAGING_DIR, flush_threshold_mb=0.002, run_key="run-A")
    assert w2.resumed_state == {"documents_done": 4}
    assert staged_parts(root) == committed  # uncommitted parts deleted
    for d in range(4, N_DOCS):
        for c in doc_chunks(d):
            w2.add(c)
    close(w2, root)
    assert digests(root) == digests(ref) and len(digests(ref)) == 5
    assert not (root / STAGING_DIR).exists()


CHILD_SRC = DOC_SRC + textwrap.dedent(
    """
    import sys, time
    from qkcore.writer import DatasetWriter

    root, mode = sys.argv[1], sys.argv[2]
    w = DatasetWriter(root + "/staging", flush_threshold_mb=1 / 2**20, run_key="run-A")
    for d in range({n_docs}):
        for i, c in enumerate(doc_chunks(d)):
            w.add(c)  # threshold 0: every add spills an uncommitted part
            print("added", d, flush=True)
            if mode == "pause" and d == 3:
                time.sleep(60)  # parked after a spill past the last commit, waiting for SIGKILL
        w.commit({{"documents_done": d + 1}})
        print("committed", d + 1, flush=True)
    time.sleep(60)
    """
).format(n_docs=N_DOCS)


@pytest.mark.parametrize("mode", ["pause", "race"])
def test_sigkill_between_commits_resumes_identically(tmp_path, mode):
    ref = tmp_path / "ref"
    write_docs(ref, range(N_DOCS))
    root = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_SRC, str(root), mode], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        for line in child.stdout:
            # pause: kill while parked after an uncommitted spill; race: kill wherever it is.
            if (mode == "pause" and line.strip() == "added 3") or (mode == "race" and line.strip() == "committed 2"):
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    if mode == "pause":
        assert journal(root)["state"] == {"documents_done": 3}
        assert len(staged_parts(root)) > len(journal(root)["parts"])
    w = DatasetWriter(root / STAGING_DIR, run_key="run-A")
    done = w.resumed_state["documents_done"]
    assert done >= (3 if mode == "pause" else 2)
    assert sorted(p.name for p in w.staging_dir.iterdir()) == sorted([JOURNAL_FILE, *journal(root)["parts"]])
    for d in range(done, N_DOCS):
        for c in doc_chunks(d):
            w.add(c)
    close(w, root)
    assert digests(root) == digests(ref)


def test_different_run_key_conflicts_and_restart_discards(tmp_path):
    w = DatasetWriter(tmp_path / STAGING_DIR, flush_threshold_mb=EVERY_ADD, run_key="A")
    for c in doc_chunks(0):
        w.add(c)
    w.commit({"documents_done": 1})
    w.abort()
    for other in ({"run_key": "B"}, {}):  # different key, or none at all
        with pytest.raises(StagingConflict, match="configuration differs") as info:
            DatasetWriter(tmp_path / STAGING_DIR, **other)
        assert str(tmp_path / STAGING_DIR) in str(info.value)
        assert isinstance(info.value, ValueError)
    w = DatasetWriter(tmp_path / STAGING_DIR, run_key="B", restart=True)
    assert w.resumed_state is None and not (tmp_path / STAGING_DIR).exists()
    for c in doc_chunks(1):
        w.add(c)
    close(w, tmp_path)
    ref = tmp_path / "ref"
    write_docs(ref, range(1, 2))
    assert digests(tmp_path) == digests(ref)


def test_missing_committed_part_conflicts(tmp_path):
    w = DatasetWriter(tmp_path / STAGING_DIR, flush_threshold_mb=EVERY_ADD, run_key="A")
    w.add(chunk(make_rows(4), 0, 4))
    w.commit({})
    w.abort()
    (tmp_path / STAGING_DIR / journal(tmp_path)["parts"][0]).unlink()
    with pytest.raises(StagingConflict, match="incomplete"):
        DatasetWriter(tmp_path / STAGING_DIR, run_key="A")


def test_commit_validation(tmp_path):
    w = DatasetWriter(tmp_path / "out" / STAGING_DIR)
    w.add(chunk(make_rows(4), 0, 4))
    with pytest.raises(ValueError, match="run_key"):
        w.commit({})
    w = DatasetWriter(tmp_path / "out" / STAGING_DIR, run_key="A")
    w.add(chunk(make_rows(4), 0, 4))
    with pytest.raises(TypeError):
        w.commit({"bad": object()})
    assert not (tmp_path / "out").exists()  # a failed commit wrote nothing


def test_resumed_zero_row_configs_and_no_new_rows(tmp_path):
    w = DatasetWriter(tmp_path / STAGING_DIR, run_key="A")
    w.add(chunk(make_rows(0, heads=1), 0, 0, layer=2, kind="k", heads=(3,)))
    w.add(chunk(make_rows(5), 0, 5))
    w.commit({"done": True})
    del w
    w = DatasetWriter(tmp_path / STAGING_DIR, run_key="A")
    assert w.resumed_state == {"done": True}
    assert close(w, tmp_path) == {"l00h00q": 5, "l00h01q": 5, "l02h03k": 0}


# -- replacement, abort, discard, leftovers -----------------------------------


def test_replaces_captured_config_and_keeps_others(tmp_path):
    write(tmp_path, make_rows(10, seed=1), [])  # l00h00q, l00h01q
    other = tmp_path / "l00h01q" / "data.parquet"
    before_other = digest(other)
    rows = make_rows(4, heads=1, seed=2)
    w = DatasetWriter(tmp_path / STAGING_DIR)
    w.add(chunk(rows, 0, 4, heads=(0,)))
    assert close(w, tmp_path) == {"l00h00q": 4}
    assert read_config(tmp_path / "l00h00q").num_rows == 4
    assert digest(other) == before_other


def test_zero_row_config(tmp_path):
    rows = make_rows(0)
    w = DatasetWriter(tmp_path / STAGING_DIR)
    w.add(chunk(rows, 0, 0, layer=2, kind="k", heads=(3, 4)))
    assert close(w, tmp_path) == {"l02h03k": 0, "l02h04k": 0}
    t = read_config(tmp_path / "l02h03k")
    assert t.num_rows == 0
    assert t.schema.field("vector").type == pa.list_(pa.float32(), HEAD_DIM)
    assert t.schema.field("sliding_window").type == pa.int32()


def test_abort_without_commit_removes_staging_and_keeps_final_files(tmp_path):
    write(tmp_path, make_rows(10), [])
    before = digest(tmp_path / "l00h00q" / "data.parquet")
    w = DatasetWriter(tmp_path / STAGING_DIR, flush_threshold_mb=EVERY_ADD)
    w.add(chunk(make_rows(5, seed=9), 0, 5))
    w.add(chunk(make_rows(5, seed=9), 0, 5, layer=1))
    assert (tmp_path / STAGING_DIR).exists()
    w.abort()
    assert not (tmp_path / STAGING_DIR).exists()
    assert digest(tmp_path / "l00h00q" / "data.parquet") == before
    assert not (tmp_path / "l01h00q").exists()


def test_abort_keeps_committed_state_and_discard_removes_it(tmp_path):
    w = DatasetWriter(tmp_path / STAGING_DIR, flush_threshold_mb=EVERY_ADD, run_key="A")
    w.add(chunk(make_rows(5), 0, 5))
    w.commit({"documents_done": 1})
    w.add(chunk(make_rows(5, seed=2), 0, 5))  # spilled, uncommitted
    committed = journal(tmp_path)["parts"]
    assert len(staged_parts(tmp_path)) == len(committed) + 1
    w.abort()
    assert staged_parts(tmp_path) == committed
    assert sorted(p.name for p in w.staging_dir.iterdir()) == sorted([JOURNAL_FILE, *committed])
    w = DatasetWriter(tmp_path / STAGING_DIR, run_key="A")
    assert w.resumed_state == {"documents_done": 1}
    w.discard()
    assert not w.staging_dir.exists()
    assert DatasetWriter(tmp_path / STAGING_DIR, run_key="B").resumed_state is None  # no conflict left


def test_finalize_reports_what_it_wrote(tmp_path):
    """Rows, buckets, non-finite rows and the file hash come from the rows as written (no reread)."""
    rows = make_rows(40, seed=3)
    rows["vectors"][0, 5, 1] = np.nan
    rows["vectors"][0, 9, 0] = np.inf
    rows["vectors"][1, 5, 2] = -np.inf
    w = DatasetWriter(tmp_path / STAGING_DIR, flush_threshold_mb=0.0005, row_group_size=7)
    for lo in range(0, 40, 9):
        w.add(chunk(rows, lo, lo + 9))
    stats = w.write_final_files(tmp_path / "final")
    for name, head in (("l00h00q", 0), ("l00h01q", 1)):
        table = read_config(tmp_path / "final" / name)
        path = tmp_path / "final" / name / "data.parquet"
        buckets, counts = np.unique(table.column("bucket").to_numpy(), return_counts=True)
        vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
        assert stats[name].rows == table.num_rows == 40
        assert stats[name].bucket_counts == dict(zip(buckets.tolist(), counts.tolist()))
        assert stats[name].nonfinite_rows == int((~np.isfinite(vectors).all(axis=1)).sum()) == (2 if head == 0 else 1)
        assert stats[name].size == path.stat().st_size and stats[name].sha256 == digest(path)
        assert (stats[name].head_dim, stats[name].sliding_window) == (HEAD_DIM, None)
    assert w.staging_dir.exists(), "write_final_files leaves staging to the caller"


def test_drop_parts_after_a_finalized_commit_resumes_without_parts(tmp_path):
    w = DatasetWriter(tmp_path / STAGING_DIR, flush_threshold_mb=EVERY_ADD, run_key="A")
    w.add(chunk(make_rows(6), 0, 6))
    w.commit({"phase": "capturing"})
    stats = w.write_final_files(tmp_path / "final")
    w.commit({"phase": "finalized", "rows": {n: s.rows for n, s in stats.items()}})
    w.drop_parts()
    assert staged_parts(tmp_path) == [] and journal(tmp_path)["parts"] == []
    w.abort()
    again = DatasetWriter(tmp_path / STAGING_DIR, run_key="A")
    assert again.resumed_state == {"phase": "finalized", "rows": {"l00h00q": 6, "l00h01q": 6}}


def test_orphan_parts_after_drop_parts_crash_are_removed(tmp_path):
    """A kill between the journal rewrite and the unlinks leaves parts the next writer removes."""
    w = DatasetWriter(tmp_path / STAGING_DIR, flush_threshold_mb=EVERY_ADD, run_key="A")
    w.add(chunk(make_rows(6), 0, 6))
    w.commit({"phase": "finalized"})
    parts = staged_parts(tmp_path)
    w._write_journal([], {"phase": "finalized"})  # the first step of drop_parts(), then "killed"
    assert staged_parts(tmp_path) == parts
    DatasetWriter(tmp_path / STAGING_DIR, run_key="A")
    assert staged_parts(tmp_path) == []


def test_nothing_created_before_first_add_or_commit(tmp_path):
    root = tmp_path / "new" / "root"
    w = DatasetWriter(root / STAGING_DIR, flush_threshold_mb=1.0, run_key="A")
    assert not (tmp_path / "new").exists()
    w.add(chunk(make_rows(3), 0, 3))  # buffered, below the threshold
    assert not (tmp_path / "new").exists()
    w.abort()
    w = DatasetWriter(root / STAGING_DIR, flush_threshold_mb=EVERY_ADD, run_key="A")
    w.add(chunk(make_rows(3), 0, 3))
    assert w.staging_dir.exists()
    w.abort()  # no commit: the run leaves nothing, not even the directories it created
    assert list(tmp_path.iterdir()) == []


def test_no_temp_files_left(tmp_path):
    write(tmp_path, make_rows(30), [10, 20], flush_threshold_mb=EVERY_ADD)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".") or "tmp" in p.name]
    assert leftovers == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l00h00q", "l00h01q"]
    assert sorted(p.name for p in (tmp_path / "l00h00q").iterdir()) == ["data.parquet"]


def test_stale_staging_without_journal_is_removed(tmp_path):
    stale = tmp_path / STAGING_DIR
    stale.mkdir()
    (stale / "part-000000.arrow").write_bytes(b"garbage")
    (stale / ".part-000001.arrow.tmp").write_bytes(b"garbage")
    assert write(tmp_path, make_rows(5), []) == {"l00h00q": 5, "l00h01q": 5}
    assert not (tmp_path / STAGING_DIR).exists()


@pytest.mark.parametrize("threshold", [0, 0.0, -1.0])
def test_a_flush_threshold_the_config_would_refuse_is_refused_by_the_writer_too(tmp_path: Path, threshold: float) -> None:
    with pytest.raises(ValueError, match="flush_threshold_mb must be > 0"):
        DatasetWriter(tmp_path / STAGING_DIR, flush_threshold_mb=threshold)
