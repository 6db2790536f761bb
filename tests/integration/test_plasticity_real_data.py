"""``qkcore plasticity`` on the kinds of data a real capture produces.

Each test reproduces a defect first seen on a trained model (SmolLM2-135M): a
non-finite row, the last partial bucket, a query config with no rows, a family
with its own GQA mapping, a stray non-canonical folder. The datasets are small
synthetic captures written with the capture schema (:func:`qkcore.layout.output_schema`)
and a card written by :func:`qkcore.card.render_card`, so the analysis reads
exactly what ``qkcore sniff`` publishes.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import qkcore
from qkcore.card import ModelEntry, render_card
from qkcore.cli import main
from qkcore.layout import CARD_FILE, DATA_FILE, config_name, output_schema

HEAD_DIM = 8
BUCKET_SIZE = 16
# Every position captured: buckets 0..3 hold >= 40 queries each; bucket 4 holds
# only positions 64..69 of example 0, i.e. 6 queries < HEAD_DIM (a partial last bucket).
EXAMPLE_LENGTHS = {0: 70, 1: 60, 2: 50}
N_Q, N_KV = 4, 2
# A family whose key-head mapping is not the default q // (n_q // n_kv) = [0, 0, 1, 1].
SWAPPED = {0: 1, 1: 1, 2: 0, 3: 0}


def _model_entry(key_head_of_query: dict[int, int]) -> ModelEntry:
    return ModelEntry(
        name="test/tiny", revision="main", model_type="llama", plugin="test 0", num_layers=1,
        num_query_heads=N_Q, num_key_value_heads=N_KV, head_dim=HEAD_DIM,
        source_dataset={"path": "synthetic"},
        sampler={"type": "all", "base_rate": 1.0, "min_bucket_size": BUCKET_SIZE},
        capture={"capture_queries": True, "capture_keys": True},
        selected_heads={0: list(range(N_Q))}, key_heads={0: sorted(set(key_head_of_query.values()))},
        key_head_of_query={0: dict(key_head_of_query)}, layer_kinds={0: "full"}, sliding_windows={0: None},
        rope_layers={0: True}, notes=[], example_id_rule="row index", documents=len(EXAMPLE_LENGTHS),
        tokens=sum(EXAMPLE_LENGTHS.values()), qkcore_version=qkcore.__version__, created="2025-01-01T00:00:00+00:00",
    )


def _rows(rng: np.random.Generator, drift: float) -> dict[str, np.ndarray]:
    ex = np.concatenate([np.full(n, e) for e, n in EXAMPLE_LENGTHS.items()])
    pos = np.concatenate([np.arange(n) for n in EXAMPLE_LENGTHS.values()])
    vec = rng.normal(size=HEAD_DIM) + drift * (pos[:, None] / 64.0) + rng.normal(size=(pos.size, HEAD_DIM))
    return {"bucket": pos // BUCKET_SIZE, "example_id": ex, "position": pos, "vector": vec.astype(np.float32)}


def write_config(root: Path, name: str, rows: dict[str, np.ndarray]) -> None:
    """Write one config in the capture schema (no sliding window)."""
    n = len(rows["bucket"])
    vec = np.asarray(rows["vector"], dtype=np.float32).reshape(n, HEAD_DIM)
    table = pa.table(
        {
            "bucket": pa.array(rows["bucket"], pa.int32()),
            "example_id": pa.array(rows["example_id"], pa.int32()),
            "position": pa.array(rows["position"], pa.int32()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float32()), HEAD_DIM),
            "sliding_window": pa.array([None] * n, pa.int32()),
        },
        schema=output_schema(HEAD_DIM),
    )
    (root / name).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / name / DATA_FILE)


def make_capture(
    root: Path,
    mapping: dict[int, int] | None = None,
    *,
    card: str = "full",
    edit: Any = None,
) -> Path:
    """Layer 0 with N_Q query heads and the key heads ``mapping`` names.

    ``card``: ``"full"`` (this qkcore's card), ``"old"`` (a card from before
    ``key_head_of_query`` was recorded), or ``"none"``. ``edit(name, rows)`` may
    change a config's rows before it is written.
    """
    mapping = dict(SWAPPED if mapping is None else mapping)
    rng = np.random.default_rng(11)
    root.mkdir(parents=True, exist_ok=True)
    for q in range(N_Q):
        rows = _rows(rng, drift=1.0)
        name = config_name(0, q, "q")
        write_config(root, name, edit(name, rows) if edit else rows)
    for k in sorted(set(mapping.values())):
        rows = _rows(rng, drift=3.0)
        name = config_name(0, k, "k")
        write_config(root, name, edit(name, rows) if edit else rows)
    entry = _model_entry(mapping)
    if card == "full":
        (root / CARD_FILE).write_text(render_card(entry, {}), encoding="utf-8")
    elif card == "old":
        old = dataclasses.asdict(entry)
        del old["key_head_of_query"]
        (root / CARD_FILE).write_text("---\n" + yaml.safe_dump({"qkcore": {"models": [old]}}) + "---\n", encoding="utf-8")
    return root


def run(root: Path, out: Path, *extra: str) -> int:
    argv = [str(root), "--out", str(out), "--pairs-per-bucket", "128", "--workers", "1", "--no-progress", *extra]
    return main(["plasticity", *argv])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def outputs(out: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    return read_csv(out / "head_bucket_plasticity.csv"), read_csv(out / "head_metrics.csv")


def assert_every_nan_has_a_reason(out: Path) -> None:
    for table in outputs(out):
        for row in table:
            if math.isnan(float(row["plasticity"])):
                assert row["reason"], f"NaN plasticity without a reason: {row}"


def _poison(target: str, index: int, value: float):
    def edit(name: str, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if name == target:
            rows["vector"][index, 3] = value
        return rows

    return edit


# --- 1. non-finite rows -------------------------------------------------------------------


def test_nan_query_row_is_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Row 20 of l00h01q: example 0, position 20, bucket 1. Before: LinAlgError for every head.
    root = make_capture(tmp_path / "data", edit=_poison("l00h01q", 20, math.nan))
    assert run(root, tmp_path / "out") == 0
    summary = capsys.readouterr().out
    assert "1 non-finite query row" in summary
    buckets, heads = outputs(tmp_path / "out")
    row = next(r for r in buckets if (r["q_head"], r["bucket"]) == ("1", "1"))
    assert row["skipped_queries"] == "1"
    assert int(row["n_queries"]) == 2 * BUCKET_SIZE + (BUCKET_SIZE - 1)  # three examples, one row dropped
    assert 0.0 <= float(row["plasticity"]) <= 1.0
    assert {r["q_head"]: r["skipped_queries"] for r in heads} == {"0": "0", "1": "1", "2": "0", "3": "0"}
    assert all(0.0 <= float(r["plasticity"]) <= 1.0 for r in heads)
    assert_every_nan_has_a_reason(tmp_path / "out")


def test_inf_key_row_is_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: every pair touching the row gave NaN, so buckets read NaN with an empty reason.
    root = make_capture(tmp_path / "data", edit=_poison("l00h00k", 5, math.inf))
    assert run(root, tmp_path / "out") == 0
    assert_every_nan_has_a_reason(tmp_path / "out")
    assert "1 non-finite key row" in capsys.readouterr().out
    buckets, heads = outputs(tmp_path / "out")
    # Key head 0 serves query heads 2 and 3 under the card's mapping.
    assert {r["q_head"]: r["skipped_keys"] for r in heads} == {"0": "0", "1": "0", "2": "1", "3": "1"}
    assert all(0.0 <= float(r["plasticity"]) <= 1.0 for r in buckets if r["bucket"] != "0")


def test_bucket_of_only_non_finite_queries_has_a_reason(tmp_path: Path) -> None:
    def edit(name: str, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if name == "l00h00q":
            rows["vector"][rows["bucket"] == 2] = np.nan
        return rows

    root = make_capture(tmp_path / "data", edit=edit)
    assert run(root, tmp_path / "out") == 0
    buckets, _ = outputs(tmp_path / "out")
    row = next(r for r in buckets if (r["q_head"], r["bucket"]) == ("0", "2"))
    assert (row["n_queries"], row["skipped_queries"]) == ("0", str(3 * BUCKET_SIZE))
    assert math.isnan(float(row["plasticity"])) and row["reason"] == "all queries non-finite"
    assert_every_nan_has_a_reason(tmp_path / "out")


# --- 2. the last, partial bucket ------------------------------------------------------------


def test_small_last_bucket_is_flagged_and_left_out_of_the_means(tmp_path: Path) -> None:
    root = make_capture(tmp_path / "data")
    assert run(root, tmp_path / "out") == 0
    buckets, heads = outputs(tmp_path / "out")
    for r in buckets:
        assert r["small_bucket"] == ("true" if int(r["n_queries"]) <= HEAD_DIM else "false")
    assert {r["bucket"] for r in buckets if r["small_bucket"] == "true"} == {"4"}  # 6 queries, head_dim 8
    for head in heads:
        mine = [r for r in buckets if r["q_head"] == head["q_head"]]
        kept = [float(r["plasticity"]) for r in mine if r["small_bucket"] == "false" and r["reason"] == ""]
        assert len(kept) == 3  # buckets 1..3; bucket 0 has no earlier keys, bucket 4 is small
        assert head["n_buckets"] == "3" and head["n_small_buckets"] == "1"
        assert float(head["plasticity"]) == pytest.approx(float(np.mean(kept)), rel=1e-12)
    readme = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "left out" in readme and "--keep-small-buckets" in readme

    assert run(root, tmp_path / "kept", "--keep-small-buckets") == 0
    kept_buckets, kept_heads = outputs(tmp_path / "kept")
    assert [r["plasticity"] for r in kept_buckets] == [r["plasticity"] for r in buckets]
    for head in kept_heads:
        mine = [float(r["plasticity"]) for r in kept_buckets if r["q_head"] == head["q_head"] and r["reason"] == ""]
        assert head["n_buckets"] == "4"
        assert float(head["plasticity"]) == pytest.approx(float(np.mean(mine)), rel=1e-12)
    assert "kept" in (tmp_path / "kept" / "README.md").read_text(encoding="utf-8")


# --- 3. a query config with no rows ------------------------------------------------------------


def test_query_config_without_rows_is_listed_with_its_reason(tmp_path: Path) -> None:
    def edit(name: str, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[:0] for k, v in rows.items()} if name == "l00h03q" else rows

    root = make_capture(tmp_path / "data", edit=edit)
    assert run(root, tmp_path / "out") == 0
    buckets, heads = outputs(tmp_path / "out")
    (empty,) = [r for r in buckets if r["q_head"] == "3"]
    assert (empty["bucket"], empty["n_queries"], empty["reason"]) == ("", "0", "no rows")
    (head,) = [r for r in heads if r["q_head"] == "3"]
    assert math.isnan(float(head["plasticity"])) and head["reason"] == "no rows"
    assert {r["q_head"] for r in heads} == {"0", "1", "2", "3"}
    assert_every_nan_has_a_reason(tmp_path / "out")


# --- 4. the GQA mapping -------------------------------------------------------------------


def test_key_heads_follow_the_cards_mapping(tmp_path: Path) -> None:
    root = make_capture(tmp_path / "data", SWAPPED)
    assert run(root, tmp_path / "out") == 0
    buckets, heads = outputs(tmp_path / "out")
    assert {int(r["q_head"]): int(r["k_head"]) for r in heads} == SWAPPED
    assert {(int(r["q_head"]), int(r["k_head"])) for r in buckets} == set(SWAPPED.items())
    assert "key_head_of_query" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def test_old_card_falls_back_to_the_default_rule_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    default = {0: 0, 1: 0, 2: 1, 3: 1}
    root = make_capture(tmp_path / "data", default, card="old")
    assert run(root, tmp_path / "out") == 0
    logs = capsys.readouterr().err.splitlines()  # the command line logs to stderr (qkcore.logs)
    _, heads = outputs(tmp_path / "out")
    assert {int(r["q_head"]): int(r["k_head"]) for r in heads} == default
    assert any("[warning" in line and "key_head_of_query" in line for line in logs)
    readme = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    assert "no key_head_of_query" in readme and "q // (n_q // n_kv)" in readme


def test_explicit_head_counts_use_the_default_rule(tmp_path: Path) -> None:
    # Today's behaviour with --num-q-heads/--num-kv-heads: the default rule, even over the card.
    root = make_capture(tmp_path / "data", {0: 0, 1: 0, 2: 1, 3: 1})
    assert run(root, tmp_path / "out", "--num-q-heads", "4", "--num-kv-heads", "2") == 0
    _, heads = outputs(tmp_path / "out")
    assert {int(r["q_head"]): int(r["k_head"]) for r in heads} == {0: 0, 1: 0, 2: 1, 3: 1}
    assert "--num-q-heads" in (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def test_mapping_to_a_key_head_not_in_the_data_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_capture(tmp_path / "data", SWAPPED)
    (root / "l00h00k" / DATA_FILE).unlink()
    (root / "l00h00k").rmdir()
    assert run(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("qkcore: error:") and "l00h02q" in err and "l00h00k" in err
    assert not (tmp_path / "out").exists()  # refused before any compute


def test_mapping_without_an_entry_for_a_captured_head_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_capture(tmp_path / "data", SWAPPED)
    write_config(root, "l00h05q", _rows(np.random.default_rng(0), 1.0))  # not in the card's mapping
    assert run(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "l00h05q" in err and "key_head_of_query" in err


# --- 5. the estimator pinned next to the numbers ----------------------------------------------


def test_output_readme_states_the_estimator_and_the_source(tmp_path: Path) -> None:
    root = make_capture(tmp_path / "data")
    assert run(root, tmp_path / "out", "--seed", "7", "--locality", "0.1") == 0
    readme = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    for fact in (
        f"`{root.name} (a local data root)`",  # data source, by name: no machine path in a README that travels
        f"qkcore {qkcore.__version__}",
        "test/tiny",  # the card's model
        "Gaussian",
        "same example",
        "earlier bucket",
        "seed 7",
        "128 key pairs per bucket",
        "0.1",  # locality fraction used
        "sliding window",
        "non-finite",
        f"head_dim ({HEAD_DIM})",
    ):
        assert fact in readme, fact


# --- 7. config names from qkcore.layout ----------------------------------------------------------


def test_non_canonical_folder_is_not_a_second_copy_of_a_head(tmp_path: Path) -> None:
    # "l0h0q" is not a config name (layout wants >= 2 digits); read as l00h00q it was analysed twice.
    root = make_capture(tmp_path / "data")
    write_config(root, "l0h0q", _rows(np.random.default_rng(3), 1.0))
    assert run(root, tmp_path / "out") == 0
    buckets, heads = outputs(tmp_path / "out")
    assert [r["q_head"] for r in heads] == ["0", "1", "2", "3"]
    assert len(buckets) == len({(r["q_head"], r["bucket"]) for r in buckets})


# --- 6. the sliding window, by position (where the original is wrong) ---------------------------


def _original_rule(key_bucket: np.ndarray, query_bucket: int, window: int) -> np.ndarray:
    """attention-plasticity's rule: the window in tokens is used as a number of buckets to look back."""
    return (key_bucket < query_bucket) & (key_bucket >= query_bucket - max(int(window), 1))


@pytest.mark.parametrize(("window", "query_bucket"), [(4, 2), (20, 3), (16, 2), (40, 3)])
def test_sliding_window_keeps_exactly_the_keys_the_bucket_can_attend_to(window: int, query_bucket: int) -> None:
    import torch
    from transformers.masking_utils import sliding_window_causal_mask_function

    from qkcore.analysis.pairs import KeyIndex, eligible_keys

    position = np.arange(4 * BUCKET_SIZE)
    bucket = position // BUCKET_SIZE
    index = KeyIndex.build(bucket, np.zeros_like(position), position)
    start = query_bucket * BUCKET_SIZE
    got = eligible_keys(index, query_bucket, window, bucket_start=start)

    # Ground truth from transformers' own mask: an earlier-bucket key some query of the bucket attends to.
    queries = torch.arange(start, start + BUCKET_SIZE)[:, None]
    seen = sliding_window_causal_mask_function(window)(0, 0, queries, torch.from_numpy(position)[None, :])
    truth = seen.any(dim=0).numpy() & (bucket < query_bucket)
    assert got.tolist() == truth.tolist()
    assert set(position[got]) == set(range(max(0, start - window + 1), start))
    # The original keeps whole buckets (every earlier one here): a different answer.
    assert not np.array_equal(_original_rule(bucket, query_bucket, window), truth)


# --- bad input: one clear error naming the file ----------------------------------------------------


def test_bad_inputs_are_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_capture(tmp_path / "data")
    rows = _rows(np.random.default_rng(0), 1.0)
    short = pa.table({
        "bucket": pa.array(rows["bucket"], pa.int32()), "example_id": pa.array(rows["example_id"], pa.int32()),
        "position": pa.array(rows["position"], pa.int32()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(rows["vector"][:, :4].ravel(), pa.float32()), 4),
        "sliding_window": pa.array([None] * len(rows["bucket"]), pa.int32()),
    })
    pq.write_table(short, root / "l00h01q" / DATA_FILE)
    assert run(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("qkcore: error: l00h01q has vectors of length 4") and "l00h01k" in err

    root = make_capture(tmp_path / "mixed")
    table = pq.read_table(root / "l00h02q" / DATA_FILE)
    windows = pa.array([64] * 10 + [128] * (table.num_rows - 10), pa.int32())
    pq.write_table(table.set_column(4, "sliding_window", windows), root / "l00h02q" / DATA_FILE)
    assert run(root, tmp_path / "out") == 2
    assert "l00h02q: mixed sliding_window values [64, 128]" in capsys.readouterr().err

    root = make_capture(tmp_path / "card")
    (root / CARD_FILE).write_text("---\nqkcore: [unclosed\n", encoding="utf-8")
    assert run(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("qkcore: error:") and str(root / CARD_FILE) in err


def test_missing_folder_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Not a directory, so it is taken for a Hub repo id; offline, that cannot be read either.
    assert run(tmp_path / "missing", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qkcore: error: {tmp_path / 'missing'}: no such dataset folder")
