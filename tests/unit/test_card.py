"""Tests for qkcore.card: front matter, Hub metadata, the body's words, datasets loading."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from qkcore.card import ModelEntry, card_run_key, read_card, read_front_matter, render_card
from qkcore.datafile import ConfigStats, read_config
from qkcore.samplers import UniformSampler
from qkcore.writer import CapturedChunk, DatasetWriter

HEAD_DIM = 4


def make_model(name: str = "org/tiny", revision: str | None = "main", **kw) -> ModelEntry:
    base = dict(
        name=name,
        revision=revision,
        model_type="llama",
        plugin="qk_plugin_llama 0.1.0",
        num_layers=2,
        num_query_heads=2,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        source_dataset=dict(
            path="wikitext", name="raw", split="train", text_column="text",
            id_column=None, max_samples=10,
        ),
        sampler=UniformSampler(base_rate=1.0, min_bucket_size=16).describe(),
        capture=dict(capture_pre_rope=False, full_attention_only=True, layers=None,
                     heads=None, head_sampling=None),
        selected_heads={0: [0, 1], 1: [0]},
        key_heads={0: [0]},
        key_head_of_query={0: {0: 0, 1: 0}, 1: {0: 0}},
        layer_kinds={0: "full", 1: "sliding"},
        sliding_windows={0: None, 1: 64},
        rope_layers={0: True, 1: False},
        notes=["layer 1 is NoPE"],
        example_id_rule="row index",
        documents=3,
        tokens=30,
        qkcore_version="0.1.0",
        created="2024-01-01T00:00:00+00:00",
    )
    base.update(kw)
    return ModelEntry(**base)


def populate(root: Path) -> dict[str, ConfigStats]:
    """l00h00q, l00h01q, l00h00k, l01h00q with known buckets, finalized into ``root``."""
    rng = np.random.default_rng(0)
    w = DatasetWriter(root / ".staging")
    n = 6
    common = dict(
        example_ids=np.array([2**33 + 1, 2, 2, 7, 7, 7], np.int64),
        positions=np.array([0, 1, 0, 2, 1, 0], np.int64),
        buckets=np.array([0, 1, 1, 2, 2, 2], np.int64),
    )
    w.add(CapturedChunk(0, "q", [0, 1], vectors=rng.standard_normal((2, n, HEAD_DIM)).astype(np.float32),
                        sliding_window=None, **common))
    w.add(CapturedChunk(0, "k", [0], vectors=rng.standard_normal((1, n, HEAD_DIM)).astype(np.float32),
                        sliding_window=None, **common))
    w.add(CapturedChunk(1, "q", [0], vectors=rng.standard_normal((1, n, HEAD_DIM)).astype(np.float32),
                        sliding_window=64, **common))
    stats = w.write_final_files(root)
    w.discard()
    return stats


def write(root: Path, stats: dict[str, ConfigStats], entry: ModelEntry, **kw) -> str:
    text = render_card(entry, stats, **kw)
    (root / "README.md").write_text(text, encoding="utf-8")
    return text


def test_front_matter_lists_configs_coverage_and_the_model(tmp_path):
    stats = populate(tmp_path)
    write(tmp_path, stats, make_model(run_key="abc123"))
    front, body = read_front_matter(tmp_path / "README.md")
    names = [c["config_name"] for c in front["configs"]]
    assert names == ["l00h00k", "l00h00q", "l00h01q", "l01h00q"]
    assert front["configs"][1]["data_files"] == [{"split": "train", "path": "l00h00q/data.parquet"}]
    qk = front["qkcore"]
    assert qk["run_key"] == "abc123"
    assert qk["coverage"] == {"layers": 2, "query_head_configs": 3, "key_head_configs": 1, "rows": 24}
    assert "stats" not in qk  # per-config statistics live in the manifest (qkcore.json)
    assert len(qk["models"]) == 1
    model = qk["models"][0]
    assert model == dataclasses.asdict(make_model(run_key="abc123"))  # int keys survive the round trip
    assert model["key_head_of_query"] == {0: {0: 0, 1: 0}, 1: {0: 0}}
    assert 'load_dataset("' in body and "l00h00k" in body
    assert "NoPE" in body and "| bucket | query rows | key rows |" in body
    assert card_run_key((tmp_path / "README.md").read_text()) == "abc123"


def test_hub_metadata_users_expect(tmp_path):
    stats = populate(tmp_path)
    front = read_card(render_card(make_model(), stats, license="apache-2.0"))
    assert front["pretty_name"] == "Query/key vectors of org/tiny"
    assert front["license"] == "apache-2.0"
    assert "qkcore" in front["tags"] and front["task_categories"] == ["feature-extraction"]
    assert "license" not in read_card(render_card(make_model(), stats))  # unknown: left out, not guessed


def test_bucket_table_sums_the_written_rows(tmp_path):
    stats = populate(tmp_path)
    body = render_card(make_model(), stats)
    for name, st in stats.items():
        buckets = read_config(tmp_path / name).column("bucket").to_pylist()
        assert st.rows == len(buckets)
        assert st.bucket_counts == {b: buckets.count(b) for b in set(buckets)}
    # 3 query configs and 1 key config, each with buckets 0: 1 row, 1: 2 rows, 2: 3 rows.
    assert "| 0 | 3 | 1 |" in body and "| 1 | 6 | 2 |" in body and "| 2 | 9 | 3 |" in body


def test_no_python_none_and_no_machine_paths_in_the_prose(tmp_path):
    stats = populate(tmp_path)
    entry = make_model(revision=None, source_dataset=dict(path="corpus.jsonl", name=None, split="train",
                                                          text_column="text", id_column=None, max_samples=None))
    text = render_card(entry, stats)
    body = text.split("\n---\n", 1)[1]
    assert "None" not in body
    assert "default revision" in body and "ids are row indices" in body
    assert str(tmp_path) not in text


def test_pre_rope_runs_are_not_called_post_rope(tmp_path):
    stats = populate(tmp_path)
    capture = dict(capture_pre_rope=True, full_attention_only=True, layers=None, heads=None, head_sampling=None)
    body = render_card(make_model(capture=capture), stats).split("\n---\n", 1)[1]
    intro = body.split("## Model")[0]
    assert "Pre-RoPE (before rotary embedding)" in intro and "post" not in intro.lower()
    assert "the pre-RoPE query or key" in body


def test_nonfinite_rows_are_stated_only_when_there_are_some(tmp_path):
    stats = populate(tmp_path)
    assert "NaN" not in render_card(make_model(), stats)
    stats["l00h00q"] = dataclasses.replace(stats["l00h00q"], nonfinite_rows=2)
    text = render_card(make_model(nonfinite_rows=2), stats)
    assert "2 rows hold a NaN or an infinity" in text and "l00h00q: 2" in text


def test_load_dataset_reads_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    data.mkdir()
    write(data, populate(data), make_model())
    import datasets

    ds = datasets.load_dataset(str(data), "l00h00q", split="train", cache_dir=str(tmp_path / "cache"))
    expected = read_config(data / "l00h00q").to_pylist()
    got = ds.to_list()
    assert len(got) == len(expected) == 6
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        assert {k: g[k] for k in g if k != "vector"} == {k: e[k] for k in e if k != "vector"}
        np.testing.assert_array_equal(np.asarray(g["vector"], np.float32), np.asarray(e["vector"], np.float32))
    sw = datasets.load_dataset(str(data), "l01h00q", split="train", cache_dir=str(tmp_path / "cache"))
    assert set(sw["sliding_window"]) == {64}


@pytest.mark.parametrize(
    "text",
    [
        "---\nconfigs: [unclosed\n---\nbody\n",
        "---\nlicense: mit\nno closing fence\n",
        "# just a README\n",
        "---\nqkcore: 3\n---\n",
    ],
)
def test_cards_that_are_not_qkcore_cards_have_no_run_key(text):
    assert card_run_key(text) is None


def test_the_log_sampler_is_named_as_sniff_qk_names_it_with_its_effective_bucket(tmp_path):
    from qkcore.samplers import LogUniformSampler

    stats = populate(tmp_path)
    sampler = LogUniformSampler(base_rate=1.0, min_bucket_size=100).describe()
    assert sampler["effective_min_bucket_size"] == 128
    body = render_card(make_model(sampler=sampler), stats)
    assert "`log_uniform` (sniff-qk calls it `log`)" in body
    assert "min_bucket_size 100 (effective 128: the power of two used)" in body


@pytest.mark.parametrize("token_strings", [False, True])
def test_the_schema_table_lists_every_column_of_the_data_files(tmp_path: Path, token_strings: bool) -> None:
    from qkcore.layout import output_schema

    stats = populate(tmp_path)
    capture = dict(make_model().capture, capture_token_strings=token_strings)
    text = render_card(make_model(capture=capture), stats)
    table = text.split("## Schema", 1)[1].split("## Loading", 1)[0]
    listed = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    assert listed == output_schema(HEAD_DIM, token_strings).names
    assert ("| `token_str` | string |" in table) is token_strings


def test_a_model_entry_reads_back_from_the_card_it_wrote(tmp_path: Path) -> None:
    entry = make_model()
    front = read_card(render_card(entry, populate(tmp_path)))
    assert ModelEntry.from_json(front["qkcore"]["models"][0]) == entry
    with pytest.raises(ValueError, match="num_layers"):
        ModelEntry.from_json({k: v for k, v in dataclasses.asdict(entry).items() if k != "num_layers"})


def test_manifest_lists_buckets_in_numeric_order():
    import json

    from qkcore.manifest import Manifest
    from qkcore.run_state import RunIdentity

    stats = ConfigStats(rows=6, bucket_counts={10: 1, 2: 2, 0: 3}, nonfinite_rows=0, head_dim=HEAD_DIM,
                        sliding_window=None, size=1, sha256="0" * 64)
    text = Manifest(RunIdentity("0123456789abcdef", {"z": 1, "a": {"y": 2, "b": 3}}), {"l00h00q": stats}).to_json()
    data = json.loads(text)
    assert list(data["configs"]["l00h00q"]["bucket_counts"]) == ["0", "2", "10"]  # not "0", "10", "2"
    assert list(data) == sorted(data) and list(data["identity"]["a"]) == ["b", "y"]  # other keys stay sorted
    assert Manifest.from_json(text).configs["l00h00q"].bucket_counts == {0: 3, 2: 2, 10: 1}
