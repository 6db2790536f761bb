"""End-to-end ``plasticity`` analysis on a small synthetic dataset folder."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import click
import numpy as np
import pluggy
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qkcore import builtin, hookspecs
from qkcore.analysis.data import LocalSource
from qkcore.analysis.pairs import KeyIndex, eligible_keys, sample_key_pairs
from qkcore.cli import main

HEAD_DIM = 8
BUCKET_SIZE = 16
WINDOW = 20
EXAMPLE_LENGTHS = {0: 64, 1: 50, 2: 37, 7: 60}
# Layer 0 captures every query head, layer 1 (sliding) a sample of them.
Q_HEADS = {0: [0, 1, 2, 3], 1: [1, 2]}
KV_HEADS = {0: [0, 1], 1: [0, 1]}
CARD = f"""---
configs:
- config_name: l00h00q
  data_files: l00h00q/data.parquet
qkcore:
  models:
  - model_id: test/tiny
    num_query_heads: 4
    num_key_value_heads: 2
    rope_layers: {{0: true, 1: false}}
    layer_kinds: {{0: full, 1: sliding}}
    sliding_windows: {{0: null, 1: {WINDOW}}}
    sampler: {{type: uniform, base_rate: 1.0, min_bucket_size: {BUCKET_SIZE}}}
---
# tiny synthetic capture
"""

SCHEMA = pa.schema(
    [
        ("bucket", pa.int32()),
        ("example_id", pa.int32()),
        ("position", pa.int32()),
        ("vector", pa.list_(pa.float32(), HEAD_DIM)),
        ("sliding_window", pa.int32()),
    ]
)


def _write_head(root: Path, name: str, rng: np.random.Generator, window: int | None, drift: float) -> None:
    """Write one head with every position of every example captured (uniform buckets)."""
    ex, pos = [], []
    for example, length in EXAMPLE_LENGTHS.items():
        ex += [example] * length
        pos += list(range(length))
    pos_a = np.array(pos, dtype=np.int32)
    base = rng.normal(size=HEAD_DIM)
    # Position-dependent mean so buckets differ, plus noise so covariances are full rank.
    vec = (base + drift * np.outer(pos_a / 64.0, np.ones(HEAD_DIM)) + rng.normal(size=(pos_a.size, HEAD_DIM))).astype(np.float32)
    table = pa.table(
        {
            "bucket": pa.array(pos_a // BUCKET_SIZE, pa.int32()),
            "example_id": pa.array(ex, pa.int32()),
            "position": pa.array(pos_a, pa.int32()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float32()), HEAD_DIM),
            "sliding_window": pa.array([window] * pos_a.size, pa.int32()),
        },
        schema=SCHEMA,
    )
    (root / name).mkdir()
    pq.write_table(table, root / name / "data.parquet")


def _make_dataset(root: Path, card: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for layer in Q_HEADS:
        window = WINDOW if layer == 1 else None
        for h in Q_HEADS[layer]:
            _write_head(root, f"l{layer:02d}h{h:02d}q", rng, window, drift=1.0)
        for h in KV_HEADS[layer]:
            _write_head(root, f"l{layer:02d}h{h:02d}k", rng, window, drift=3.0)
    if card:
        (root / "README.md").write_text(CARD, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_dataset(tmp_path_factory.mktemp("capture"))


def _run(root: Path, out: Path | None, *extra: str) -> int:
    argv = [str(root), "--pairs-per-bucket", "256", "--workers", "1", "--no-progress", *extra]
    if out is not None:
        argv += ["--out", str(out)]
    return main(["plasticity", *argv])


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_registered_through_the_hook() -> None:
    pm = pluggy.PluginManager("qkcore")
    pm.add_hookspecs(hookspecs)
    pm.register(builtin)
    cli = click.Group()
    pm.hook.qkcore_register_commands(cli=cli)
    analysis = cli.commands["plasticity"]
    assert isinstance(analysis, click.Command)
    assert analysis.name == "plasticity" and analysis.help


def test_outputs_cover_every_captured_query_head(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(dataset, out) == 0
    for name in ("head_bucket_plasticity.csv", "head_metrics.csv", "plasticity.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "plasticity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    buckets = _read_csv(out / "head_bucket_plasticity.csv")
    heads = _read_csv(out / "head_metrics.csv")
    assert list(buckets[0]) == [
        "layer", "q_head", "k_head", "bucket", "n_queries", "skipped_queries", "n_pairs", "plasticity", "small_bucket", "reason"
    ]
    assert list(heads[0]) == [
        "layer", "q_head", "k_head", "plasticity", "n_buckets", "n_small_buckets", "skipped_queries", "skipped_keys",
        "nope", "sliding_window", "reason",
    ]
    captured = {(layer, h) for layer, hs in Q_HEADS.items() for h in hs}
    assert {(int(r["layer"]), int(r["q_head"])) for r in heads} == captured
    assert {(int(r["layer"]), int(r["q_head"])) for r in buckets} == captured
    n_buckets = math.ceil(max(EXAMPLE_LENGTHS.values()) / BUCKET_SIZE)
    for r in heads:
        layer, q = int(r["layer"]), int(r["q_head"])
        assert int(r["k_head"]) == q // 2  # GQA: 4 query heads over 2 key heads
        assert r["nope"] == ("true" if layer == 1 else "false")
        assert r["sliding_window"] == (str(WINDOW) if layer == 1 else "")
        assert int(r["n_buckets"]) == n_buckets - 1  # bucket 0 has no earlier keys
        assert 0.0 <= float(r["plasticity"]) <= 1.0
    for r in buckets:
        if r["bucket"] == "0":
            assert math.isnan(float(r["plasticity"])) and r["reason"] == "no eligible keys"
            assert r["n_pairs"] == "0"
        else:
            assert 0.0 <= float(r["plasticity"]) <= 1.0 and r["reason"] == ""
            assert r["n_pairs"] == "256"


def test_readme_names_the_data_root_without_a_machine_path_or_another_models_numbers(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(dataset, out) == 0
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert f"- Data: `{dataset.name} (a local data root)`" in readme
    assert str(dataset.resolve()) not in readme and str(tmp_path) not in readme
    assert "SmolLM2" not in readme  # the card's model is test/tiny: no sentence about another model


def test_default_out_dir_and_too_few_queries(tmp_path: Path) -> None:
    root = _make_dataset(tmp_path / "data")
    assert _run(root, None, "--min-queries", "1000") == 0
    rows = _read_csv(root / "plasticity" / "head_bucket_plasticity.csv")
    assert {r["reason"] for r in rows if r["bucket"] != "0"} == {"too few queries"}


def test_same_seed_gives_identical_csvs(dataset: Path, tmp_path: Path) -> None:
    names = ("head_bucket_plasticity.csv", "head_metrics.csv")
    assert _run(dataset, tmp_path / "a", "--seed", "3") == 0
    assert _run(dataset, tmp_path / "b", "--seed", "3") == 0
    # Worker processes must not change the numbers (seeds are per head and bucket).
    assert _run(dataset, tmp_path / "c", "--seed", "3", "--workers", "2") == 0
    assert _run(dataset, tmp_path / "d", "--seed", "4") == 0
    for name in names:
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes()
        assert a == (tmp_path / "c" / name).read_bytes()
    assert (tmp_path / "a" / names[0]).read_bytes() != (tmp_path / "d" / names[0]).read_bytes()


def test_without_card_needs_head_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _make_dataset(tmp_path / "data", card=False)
    assert _run(root, tmp_path / "out") == 2
    assert "--num-q-heads" in capsys.readouterr().err
    assert _run(root, tmp_path / "out", "--num-q-heads", "4", "--num-kv-heads", "2") == 0
    heads = _read_csv(tmp_path / "out" / "head_metrics.csv")
    assert {r["nope"] for r in heads} == {""}  # unknown without a card
    # The sliding window still comes from the data itself.
    assert {r["sliding_window"] for r in heads if r["layer"] == "1"} == {str(WINDOW)}


@pytest.mark.parametrize("window", [None, WINDOW])
def test_pair_sampler_respects_causality_window_and_locality(dataset: Path, window: int | None) -> None:
    keys = LocalSource(dataset).read(1, 0, "k")
    assert keys is not None
    index = KeyIndex.build(keys.bucket, keys.example_id, keys.position)
    for t in range(1, 4):
        start = t * BUCKET_SIZE
        pairs = sample_key_pairs(index, t, 4000, np.random.default_rng(t), window=window, bucket_start=start)
        assert pairs.shape == (4000, 2)
        a, b = pairs[:, 0], pairs[:, 1]
        assert np.all(a != b)  # never the same key twice
        assert np.all(keys.example_id[a] == keys.example_id[b])  # same example
        assert np.all(keys.bucket[pairs] < t)  # causal
        if window is not None:
            # Only keys some query of the bucket can see (transformers: p - w < k <= p).
            assert np.all(keys.position[pairs] > start - window)
            if t == 3:  # window (28, 48): bucket 0 excluded, tail of bucket 1 kept
                assert not np.any(keys.bucket[pairs] == 0)
                assert np.any(keys.bucket[pairs] == 1)
        # Locality: 5% of the example's captured length, never empty.
        bound = np.floor(0.05 * np.array([EXAMPLE_LENGTHS[e] for e in keys.example_id[a]]))
        gap = np.abs(keys.position[a] - keys.position[b])
        assert np.all((gap <= bound) | (gap == 1))
        # Order randomised: the earlier key comes first in about half the pairs.
        assert 0.4 < np.mean(keys.position[a] < keys.position[b]) < 0.6
        # Examples weighted by their eligible keys.
        mask = eligible_keys(index, t, window, start)
        ids, counts = np.unique(keys.example_id[mask], return_counts=True)
        freq = np.array([np.mean(keys.example_id[a] == e) for e in ids])
        np.testing.assert_allclose(freq, counts / counts.sum(), atol=0.05)


def test_pair_sampler_falls_back_to_nearest_key() -> None:
    # One example with keys far apart: the 5% bound (50 positions) holds no other key.
    pos = np.array([0, 100, 180, 1000])
    index = KeyIndex.build(np.zeros(4, dtype=int), np.zeros(4, dtype=int), pos)
    pairs = sample_key_pairs(index, 1, 500, np.random.default_rng(0))
    nearest = {0: {1}, 1: {2}, 2: {1}, 3: {2}}
    for x, y in pairs.tolist():
        assert y in nearest[x] or x in nearest[y]


def test_pair_sampler_without_pairs_is_empty() -> None:
    index = KeyIndex.build(np.array([0, 1]), np.array([0, 1]), np.array([0, 20]))
    assert sample_key_pairs(index, 2, 10, np.random.default_rng(0)).shape == (0, 2)
    assert sample_key_pairs(index, 0, 10, np.random.default_rng(0)).shape == (0, 2)


def test_hub_repo_path_offline(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-directory argument goes through datasets/huggingface_hub (stubbed to the local copy)."""
    import datasets
    import huggingface_hub

    calls: list[tuple[str, str, str | None]] = []

    def fake_load_dataset(repo: str, name: str, revision: str | None = None, split: str | None = None) -> datasets.Dataset:
        calls.append((repo, name, revision))
        table = pq.read_table(dataset / name / "data.parquet")
        # The Hub round trip turns fixed-size lists into plain lists.
        return datasets.Dataset(table.set_column(3, "vector", table.column("vector").cast(pa.list_(pa.float32()))))

    def fake_download(repo: str, filename: str, repo_type: str, revision: str | None = None) -> str:
        return str(dataset / filename)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda repo, revision=None: sorted(p.name for p in dataset.iterdir() if p.is_dir() and p.name[0] == "l"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.chdir(tmp_path)
    assert _run(Path("someone/sniffed-qk"), None, "--revision", "tiny-branch") == 0
    assert {c[2] for c in calls} == {"tiny-branch"}
    assert "someone/sniffed-qk@tiny-branch" in (tmp_path / "plasticity" / "README.md").read_text(encoding="utf-8")
    hub_rows = (tmp_path / "plasticity" / "head_bucket_plasticity.csv").read_bytes()
    assert _run(dataset, tmp_path / "local") == 0
    assert hub_rows == (tmp_path / "local" / "head_bucket_plasticity.csv").read_bytes()
