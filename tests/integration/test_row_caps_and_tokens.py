"""``capture.max_rows_per_batch`` and ``capture.capture_token_strings``, exactly as sniff-qk does them.

The expected positions below were computed by running the original tool's
``sniffer.core.Sniffer.capture`` (qk-sniffer at a8baacf) on layer 1 of a batch of two
documents (lengths 40 and 33, ids -2**40 + 17 and 123456789012), with its
``UniformSampler(base_rate=4, bucket_size=8)``, ``max_rows_per_batch=5``, query heads
{2, 5} and key heads {0, 1}: it keeps the sampler's positions, and where more than 5
remain, ``torch.randperm`` seeded from (layer, first head, kind, id) picks 5, in that order.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qkcore.config import load_config
from qkcore.layout import TOKEN_COLUMN
from qkcore.samplers import UniformSampler, cap_rows, keep_indices
from qkcore.seeding import subsample_seed
from qkcore.sniff import run_sniff
from qkcore.sources.tokenizer import byte_tokenizer
from tests.conftest import TEXTS

ORIGINAL = {
    ("q", 2, -(2**40) + 17, 40): [1, 7, 18, 13, 31],
    ("q", 2, 123456789012, 33): [3, 20, 28, 2, 29],
    ("k", 0, -(2**40) + 17, 40): [16, 36, 19, 13, 29],
    ("k", 0, 123456789012, 33): [6, 21, 3, 16, 32],
}


@pytest.mark.parametrize(("kind", "first_head", "example_id", "length"), list(ORIGINAL))
def test_capped_positions_are_the_originals(kind, first_head, example_id, length) -> None:
    sampler = UniformSampler(base_rate=4.0, min_bucket_size=8)
    kept = keep_indices(sampler, length, example_id, 1, kind)
    assert kept.numel() > 5  # the cap applies
    assert cap_rows(kept, 5, example_id, 1, kind, first_head).tolist() == ORIGINAL[(kind, first_head, example_id, length)]


def test_under_the_cap_or_without_one_nothing_changes() -> None:
    kept = keep_indices(UniformSampler(base_rate=4.0, min_bucket_size=8), 40, 7, 1, "q")
    for limit in (None, 0, -3, kept.numel(), kept.numel() + 10):
        assert cap_rows(kept, limit, 7, 1, "q", 0) is kept


def test_the_subsample_seed_lays_out_its_bits_as_the_original() -> None:
    assert subsample_seed(example_id=1, layer=2, head=3, kind="k") == 2 | (3 << 16) | (ord("k") << 32) | (1 << 40)
    # Only the low 32 bits of the id count, the rest is cut at 64 bits.
    assert subsample_seed(2**33 + 1, 2, 3, "q") == subsample_seed(1, 2, 3, "q")
    assert subsample_seed(-1, 0, 0, "q") == ((0xFFFFFFFF << 40) | (ord("q") << 32)) & (2**64 - 1)


def test_a_run_caps_rows_per_document_and_records_each_rows_token(tiny_config, tmp_path) -> None:
    from qkcore.example_ids import normalize_example_id
    from qkcore.samplers import AllSampler

    config = tiny_config(capture={"sampler": {"type": "all"}, "layers": [1], "heads": [0, 5],
                                  "max_rows_per_batch": 7, "capture_token_strings": True})
    result = run_sniff(load_config(config))
    # Query heads 0 and 5 attend with key heads 0 and 1: the first head of each kind is 0.
    assert sorted(result.rows) == ["l01h00k", "l01h00q", "l01h01k", "l01h05q"]
    tokenizer, sampler = byte_tokenizer(), AllSampler(base_rate=1.0, min_bucket_size=16)
    documents = {normalize_example_id(i): text for i, text in TEXTS}
    for name in result.rows:
        table = pq.read_table(result.data_root / name / "data.parquet")
        assert table.schema.names[-1] == TOKEN_COLUMN and table.schema.field(TOKEN_COLUMN).type == pa.string()
        rows = table.to_pydict()
        for example_id, text in documents.items():
            mine = [i for i, e in enumerate(rows["example_id"]) if e == np.int64(example_id).astype(np.int32)]
            ids = tokenizer(text)["input_ids"]
            kept = cap_rows(keep_indices(sampler, len(ids), example_id, 1, name[-1]), 7, example_id, 1, name[-1], 0)
            assert len(mine) == min(7, len(ids))
            assert sorted(rows["position"][i] for i in mine) == sorted(kept.tolist())
            tokens = tokenizer.convert_ids_to_tokens(ids)
            assert [rows[TOKEN_COLUMN][i] for i in mine] == [tokens[rows["position"][i]] for i in mine]


def test_without_token_strings_there_is_no_token_column(tiny_config) -> None:
    result = run_sniff(load_config(tiny_config(capture={"sampler": {"type": "all"}, "layers": [0]})))
    for name in result.rows:
        assert TOKEN_COLUMN not in pq.read_schema(result.data_root / name / "data.parquet").names


def test_token_column_survives_spills_and_resume_ordering(tmp_path) -> None:
    """Token strings travel with their rows through spills and the final sort."""
    from qkcore.writer import CapturedChunk, DatasetWriter

    rng = np.random.default_rng(0)
    w = DatasetWriter(tmp_path / "staging", flush_threshold_mb=0.0005, token_strings=True)
    for doc in range(5):
        positions = rng.permutation(30)
        w.add(CapturedChunk(0, "q", [0], np.full(30, doc, np.int64), positions.astype(np.int64),
                            np.zeros(30, np.int64), rng.standard_normal((1, 30, 4)).astype(np.float32), None,
                            token_strings=np.array([f"d{doc}p{p}" for p in positions], dtype=object)))
    w.write_final_files(tmp_path / "final")
    table = pq.read_table(tmp_path / "final" / "l00h00q" / "data.parquet").to_pydict()
    assert table[TOKEN_COLUMN] == [f"d{e}p{p}" for e, p in zip(table["example_id"], table["position"])]
