"""Tests for qkcore.card: front matter, datasets loading, merging, error handling."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from qkcore.card import ModelEntry, read_front_matter, write_card
from qkcore.writer import CapturedChunk, DatasetWriter, read_config

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
        sampler=dict(kind="uniform", buckets=[0, 1, 2]),
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


def populate(root: Path) -> None:
    """l00h00q, l00h01q, l00h00k, l01h00q with known buckets."""
    rng = np.random.default_rng(0)
    w = DatasetWriter(root)
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
    w.close()


def test_front_matter_lists_configs_and_stats(tmp_path):
    populate(tmp_path)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "l05h00q").mkdir()  # no data.parquet: ignored
    front = write_card(tmp_path, tmp_path / "README.md", make_model())
    names = [c["config_name"] for c in front["configs"]]
    assert names == ["l00h00k", "l00h00q", "l00h01q", "l01h00q"]
    assert front["configs"][1]["data_files"] == [{"split": "train", "path": "l00h00q/data.parquet"}]
    qk = front["qkcore"]
    assert qk["stats"]["l00h00q"] == {"rows": 6, "bucket_counts": {0: 1, 1: 2, 2: 3}}
    assert qk["coverage"] == {"layers": 2, "query_head_configs": 3, "key_head_configs": 1}
    # Round trip through the file: int keys survive.
    again, body = read_front_matter(tmp_path / "README.md")
    assert again == front
    assert again["qkcore"]["models"][0]["selected_heads"] == {0: [0, 1], 1: [0]}
    assert 'load_dataset("' in body and "l00h00k" in body
    assert "NoPE" in body and "| bucket | query rows | key rows |" in body
    assert not list(tmp_path.glob(".README*"))


def test_bucket_counts_match_data(tmp_path):
    populate(tmp_path)
    front = write_card(tmp_path, tmp_path / "README.md")
    for name, st in front["qkcore"]["stats"].items():
        buckets = read_config(tmp_path / name).column("bucket").to_pylist()
        assert st["rows"] == len(buckets)
        assert st["bucket_counts"] == {b: buckets.count(b) for b in set(buckets)}


def test_load_dataset_reads_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    populate(data)
    write_card(data, data / "README.md", make_model())
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


def test_merge_keeps_other_models_and_unknown_keys(tmp_path):
    populate(tmp_path)
    readme = tmp_path / "README.md"
    write_card(tmp_path, readme, make_model("org/a"))
    front, body = read_front_matter(readme)
    front = {"license": "mit", **front, "tags": ["attention"], "dataset_info": {"stale": True}}
    front["qkcore"]["custom"] = "kept"
    readme.write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n" + body)

    new = write_card(tmp_path, readme, make_model("org/b"))
    assert [m["name"] for m in new["qkcore"]["models"]] == ["org/a", "org/b"]
    assert new["license"] == "mit" and new["tags"] == ["attention"]
    assert list(new)[0] == "license"
    assert new["qkcore"]["custom"] == "kept"
    assert "dataset_info" not in new  # stale split sizes would break load_dataset
    assert read_front_matter(readme)[0] == new


def test_rerun_same_model_replaces_entry(tmp_path):
    populate(tmp_path)
    readme = tmp_path / "README.md"
    write_card(tmp_path, readme, make_model("org/a"))
    write_card(tmp_path, readme, make_model("org/b"))
    write_card(tmp_path, readme, make_model("org/a", revision="v2"))
    front = write_card(tmp_path, readme, make_model("org/a", tokens=999))
    models = front["qkcore"]["models"]
    assert [(m["name"], m["revision"]) for m in models] == [
        ("org/a", "main"), ("org/b", "main"), ("org/a", "v2"),
    ]
    assert models[0]["tokens"] == 999
    assert models[0] == dataclasses.asdict(make_model("org/a", tokens=999))


def test_no_model_keeps_existing_entries(tmp_path):
    populate(tmp_path)
    readme = tmp_path / "README.md"
    write_card(tmp_path, readme, make_model("org/a"))
    front = write_card(tmp_path, readme)
    assert [m["name"] for m in front["qkcore"]["models"]] == ["org/a"]


@pytest.mark.parametrize(
    "text",
    [
        "---\nconfigs: [unclosed\n---\nbody\n",
        "---\nlicense: mit\nno closing fence\n",
        "---\n- just\n- a list\n---\n",
        "---\nqkcore:\n  models: 3\n---\n",
    ],
)
def test_broken_front_matter_raises_naming_file(tmp_path, text):
    populate(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(ValueError, match="README.md"):
        write_card(tmp_path, readme, make_model())
    assert readme.read_text() == text  # never overwritten


def test_readme_without_front_matter_is_regenerated(tmp_path):
    populate(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# old notes\n")
    front = write_card(tmp_path, readme, make_model())
    assert readme.read_text().startswith("---\n")
    assert len(front["configs"]) == 4


def test_empty_root(tmp_path):
    front = write_card(tmp_path, tmp_path / "README.md")
    assert front["configs"] == []
    assert front["qkcore"]["coverage"] == {"layers": 0, "query_head_configs": 0, "key_head_configs": 0}
