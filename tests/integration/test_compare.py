"""``qkcore compare`` on synthetic runs whose plasticity per head is known exactly.

Each run is a data root in the capture schema with a card from :func:`qkcore.card.render_card`,
so the comparison reads what ``qkcore sniff`` publishes. Its heads are built so the estimator's
answer is known in closed form: every key of a key head lies on one line (``k = (a * position,
c, c, c)``), so every key pair differs along the first axis only, and the queries of each bucket
are whitened to sample mean ``(z, 0, 0, 0)`` and sample covariance exactly ``I``. Then every pair
gives ``p = Phi(+-z)`` and the head's plasticity is ``AP = 4 Phi(z) Phi(-z)`` up to float32
rounding, whatever pairs are drawn.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import qkcore
from qkcore.analysis.compare import compare_runs, order_runs, resolve_runs
from qkcore.analysis.compare_plots import trajectory_panels
from qkcore.analysis.provenance import PROVENANCE_FILE, RunFacts, parse_checkpoint, read_provenance
from qkcore.card import ModelEntry, render_card
from qkcore.cli import main
from qkcore.errors import QkcoreError
from qkcore.datafile import ConfigStats
from qkcore.layout import CARD_FILE, DATA_FILE, config_name, output_schema

HEAD_DIM = 4
LAYERS = 4
NOPE = (1, 3)
N_Q, N_KV = 2, 1
EXAMPLES, LENGTH, BUCKETS = 6, 256, 4  # 4 buckets of 6 x 64 = 384 queries each
#: (revision, max_length) of the five "checkpoints", as SmolLM3 names them; listed out of order.
CHECKPOINTS = [
    ("stage2-step-4200000", 4096),
    ("stage1-step-40000", 4096),
    ("lc-32k-to-64k-step-20000", 65536),
    ("stage1-step-1200000", 4096),
    ("lc-4k-to-32k-step-4000", 32768),
]
ORDER = ["stage1-step-40000", "stage1-step-1200000", "stage2-step-4200000", "lc-4k-to-32k-step-4000",
         "lc-32k-to-64k-step-20000"]


def known_plasticity(revision: str, layer: int, q_head: int) -> float:
    """The plasticity each head is built to have: RoPE heads rise along training, NoPE heads stay high."""
    t = ORDER.index(revision) if revision in ORDER else 0
    if layer in NOPE:
        return 0.9 - 0.02 * q_head
    return 0.25 + 0.12 * t + 0.05 * q_head + 0.01 * layer


def _z(ap: float) -> float:
    """The standardised key-score gap whose AP = 4 Phi(z) Phi(-z) is ``ap``."""
    p = (1 + math.sqrt(1 - ap)) / 2
    lo, hi = 0.0, 10.0  # Phi is increasing: bisect Phi(z) = p
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * math.erfc(-mid / math.sqrt(2)) < p else (lo, mid)
    return lo


def _whitened(rng: np.random.Generator, n: int, mean: np.ndarray) -> np.ndarray:
    """``n`` vectors whose sample mean is ``mean`` and unbiased sample covariance is exactly ``I``."""
    x = rng.normal(size=(n, mean.size))
    x -= x.mean(axis=0)
    chol = np.linalg.cholesky(np.cov(x, rowvar=False))
    return x @ np.linalg.inv(chol).T + mean


def _write(root: Path, name: str, bucket: np.ndarray, example: np.ndarray, position: np.ndarray, vec: np.ndarray) -> None:
    table = pa.table({
        "bucket": pa.array(bucket, pa.int32()), "example_id": pa.array(example, pa.int32()),
        "position": pa.array(position, pa.int32()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.astype(np.float32).ravel(), pa.float32()), HEAD_DIM),
        "sliding_window": pa.array([None] * len(bucket), pa.int32()),
    }, schema=output_schema(HEAD_DIM))
    (root / name).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / name / DATA_FILE)


def make_run(root: Path, revision: str, max_length: int, run_key: str, *, heads: dict[int, list[int]] | None = None,
             model: str = "HuggingFaceTB/SmolLM3-3B-checkpoints", values=known_plasticity, seed: int = 0) -> Path:
    """A data root of one synthetic checkpoint run (positions scaled to ``max_length``, 16 buckets' worth)."""
    heads = heads or {layer: list(range(N_Q)) for layer in range(LAYERS)}
    bucket_size = max_length // 16
    scale = bucket_size // (LENGTH // BUCKETS)
    rng = np.random.default_rng(seed)
    idx = np.tile(np.arange(LENGTH), EXAMPLES)
    example = np.repeat(np.arange(EXAMPLES), LENGTH)
    position, bucket = idx * scale, idx // (LENGTH // BUCKETS)
    configs = []
    for layer, q_heads in heads.items():
        keys = np.column_stack([position * 0.01, np.full((idx.size, HEAD_DIM - 1), 0.5)])
        _write(root, config_name(layer, 0, "k"), bucket, example, position, keys)
        configs.append(config_name(layer, 0, "k"))
        for q in q_heads:
            vec = np.zeros((idx.size, HEAD_DIM))
            mean = np.array([_z(values(revision, layer, q)), 0.0, 0.0, 0.0])
            for b in range(BUCKETS):
                vec[bucket == b] = _whitened(rng, int((bucket == b).sum()), mean)
            _write(root, config_name(layer, q, "q"), bucket, example, position, vec)
            configs.append(config_name(layer, q, "q"))
    entry = ModelEntry(
        name=model, revision=revision, model_type="smollm3", plugin="test 0", num_layers=LAYERS,
        num_query_heads=N_Q, num_key_value_heads=N_KV, head_dim=HEAD_DIM,
        source_dataset={"path": "viktoroo/longbench-pro-128k-plus", "split": "test"},
        sampler={"type": "uniform", "base_rate": 1.0, "min_bucket_size": bucket_size},
        capture={"capture_queries": True, "capture_keys": True},
        selected_heads={layer: qs for layer, qs in heads.items()}, key_heads={layer: [0] for layer in heads},
        key_head_of_query={layer: {q: 0 for q in qs} for layer, qs in heads.items()},
        layer_kinds={layer: "full" for layer in range(LAYERS)}, sliding_windows={layer: None for layer in range(LAYERS)},
        rope_layers={layer: layer not in NOPE for layer in range(LAYERS)}, notes=[], example_id_rule="row index",
        documents=EXAMPLES, tokens=EXAMPLES * LENGTH, qkcore_version=qkcore.__version__,
        created="2026-01-01T00:00:00+00:00", precision={"dtype": "bfloat16"},
        tokenizer={"name": "HuggingFaceTB/SmolLM3-3B", "max_length": max_length}, run_key=run_key,
    )
    stats = {name: ConfigStats(int(idx.size), {}, 0, HEAD_DIM, None, 0, "") for name in configs}
    (root / CARD_FILE).write_text(render_card(entry, stats), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("smollm3")
    return [make_run(base / f"smollm3-{revision}", revision, max_length, f"{i + 1:016x}", seed=i)
            for i, (revision, max_length) in enumerate(CHECKPOINTS)]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


FAST = ["--pairs-per-bucket", "32", "--workers", "1", "--no-progress"]


def test_parse_checkpoint() -> None:
    assert parse_checkpoint("stage1-step-40000") == ("stage1", 40000)
    assert parse_checkpoint("lc-4k-to-32k-step-4000") == ("lc-4k-to-32k", 4000)
    assert parse_checkpoint("step143000") == (None, 143000)
    assert parse_checkpoint("main") == (None, None) and parse_checkpoint(None) == (None, None)


def test_five_checkpoints_recover_the_known_values_in_step_order(checkpoints, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, checkpoints), "--out", str(out), *FAST]) == 0
    rows = _rows(out / "head_plasticity.csv")
    assert list(rows[0]) == ["run", "model", "revision", "stage", "step", "layer", "q_head", "k_head", "nope",
                             "sliding_window", "plasticity", "n_queries"]
    # The order follows the parsed (stage, step), not the command line.
    assert list(dict.fromkeys(r["revision"] for r in rows)) == ORDER
    assert len(rows) == len(ORDER) * LAYERS * N_Q
    for r in rows:
        expected = known_plasticity(r["revision"], int(r["layer"]), int(r["q_head"]))
        assert float(r["plasticity"]) == pytest.approx(expected, abs=2e-3), r
        assert r["nope"] == str(int(r["layer"]) in NOPE).lower()
        assert int(r["n_queries"]) == EXAMPLES * LENGTH
        assert (r["stage"], int(r["step"])) == parse_checkpoint(r["revision"])
    for name in ("heatmaps.png", "trajectory.png", "distribution.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (out / "README.md").read_text(encoding="utf-8")
    for i, (revision, _) in enumerate(CHECKPOINTS):
        assert f"{i + 1:016x}" in readme and revision in readme
    assert "max length" in readme and "relative position buckets" in readme
    assert "compare: 5 runs" in capsys.readouterr().out
    # Each run was computed into runs/LABEL with its provenance; a second comparison reuses them.
    for path in checkpoints:
        provenance = read_provenance(out / "runs" / path.name)
        assert provenance is not None and provenance.run_key == RunFacts.from_card((path / CARD_FILE).read_text()).run_key
    assert main(["compare", *map(str, checkpoints), "--out", str(out), *FAST]) == 0
    assert "| reused " in (out / "README.md").read_text(encoding="utf-8")


def test_the_nope_panel_holds_exactly_the_nope_layers(checkpoints, tmp_path) -> None:
    result = compare_runs([str(p) for p in checkpoints], tmp_path / "cmp", _config(), workers=1, progress=False)
    rope, nope = trajectory_panels(result.runs, result.common)
    assert (rope.nope, nope.nope) == (False, True)
    for run in result.runs:
        assert {layer for layer, _, _ in nope.heads[run.label]} == set(NOPE)
        assert {layer for layer, _, _ in rope.heads[run.label]} == set(range(LAYERS)) - set(NOPE)
        assert len(nope.heads[run.label]) + len(rope.heads[run.label]) == LAYERS * N_Q
    # NoPE heads were built flat over training, RoPE heads rising: the panels show it.
    means = lambda panel: [float(np.mean([v for *_, v in panel.heads[r.label]])) for r in result.runs]  # noqa: E731
    assert np.ptp(means(nope)) < 0.01 and all(np.diff(means(rope)) > 0.1)
    assert result.differences.keys() == {"max length", "bucket size"}


def _config():
    from qkcore.analysis.plasticity import PlasticityConfig

    return PlasticityConfig(pairs_per_bucket=32)


def test_order_file_orders_and_labels_runs(checkpoints, tmp_path) -> None:
    order = tmp_path / "order.yaml"
    order.write_text("runs:\n" + "".join(f"- {{run: {r}, label: ckpt-{i}, step: {i}}}\n"
                                         for i, r in enumerate(reversed(ORDER))), encoding="utf-8")
    result = compare_runs([str(p) for p in checkpoints], tmp_path / "cmp", _config(), order=str(order), workers=1,
                          progress=False)
    assert [r.facts.revision for r in result.runs] == list(reversed(ORDER))
    assert [r.label for r in result.runs] == [f"ckpt-{i}" for i in range(5)]
    assert [r.step for r in result.runs] == list(range(5))


def test_a_data_root_that_now_holds_another_run_drops_its_old_outputs(tmp_path) -> None:
    from qkcore.analysis.provenance import remove_stale_outputs

    root = make_run(tmp_path / "root", "stage1-step-40000", 4096, "00000000000000aa")
    assert main(["plasticity", str(root), *FAST]) == 0
    assert main(["inspect", str(root)]) == 0
    out = root / "plasticity"
    assert read_provenance(out).run_key == "00000000000000aa"
    assert {p.name for p in out.iterdir()} >= {"heatmap.png", PROVENANCE_FILE, "head_metrics.csv"}
    assert remove_stale_outputs(root, "00000000000000aa") == []  # this very run: kept
    (out / "my-notes.txt").write_text("mine")
    removed = remove_stale_outputs(root, "00000000000000bb")
    assert "inspect.png" in removed and "plasticity/head_metrics.csv" in removed
    assert not (root / "inspect.png").exists() and [p.name for p in out.iterdir()] == ["my-notes.txt"]


def test_replace_publishes_a_new_run_and_removes_the_old_runs_outputs(tiny_config, tmp_path) -> None:
    """A real ``--replace``: the previous run's plasticity/ and inspect.png do not survive beside the new data."""
    config = tiny_config(capture={"sampler": {"type": "all"}, "min_bucket_size": 16, "head_sampling": {"count": 4, "seed": 1}})
    assert main(["sniff", "--config", str(config)]) == 0
    root = tmp_path / "out"
    assert main(["plasticity", str(root), *FAST]) == 0 and main(["inspect", str(root)]) == 0
    old_key = read_provenance(root / "plasticity").run_key
    assert old_key and (root / "inspect.png").is_file()
    assert main(["sniff", "--config", str(config), "--set", "capture.head_sampling.seed=2", "--replace"]) == 0
    assert not (root / "plasticity").exists() and not (root / "inspect.png").exists()
    assert main(["plasticity", str(root), *FAST]) == 0
    assert read_provenance(root / "plasticity").run_key not in (None, old_key)


# -- bad inputs: one clear error each ------------------------------------------------------------------


def _error(capsys, *argv: str) -> str:
    assert main(["compare", *argv, *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkcore: error:"), err
    return err[0]


def test_a_run_that_is_not_a_run(checkpoints, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert "not a run" in _error(capsys, str(checkpoints[0]), str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert "not a run" in _error(capsys, str(checkpoints[0]), str(tmp_path / "no such thing"), "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # nothing was computed or written


def test_a_root_without_its_card(tmp_path, capsys) -> None:
    root = make_run(tmp_path / "r", "stage1-step-40000", 4096, "e" * 16, heads={0: [0]})
    (root / CARD_FILE).unlink()
    line = _error(capsys, str(root), "--out", str(tmp_path / "o"))
    assert "no README.md" in line and "--num-q-heads" in line


def test_runs_with_no_heads_in_common(tmp_path, capsys) -> None:
    a = make_run(tmp_path / "a", "stage1-step-40000", 4096, "a" * 16, heads={0: [0, 1]})
    b = make_run(tmp_path / "b", "stage1-step-80000", 4096, "b" * 16, heads={2: [0, 1]})
    line = _error(capsys, str(a), str(b), "--out", str(tmp_path / "o"))
    assert "no query head in common" in line and "head_sampling" in line


def test_an_unreadable_order_file(checkpoints, tmp_path, capsys) -> None:
    bad = tmp_path / "order.yaml"
    bad.write_text("runs: [unclosed\n", encoding="utf-8")
    assert re.search(r"--order .*order\.yaml: unreadable", _error(capsys, *map(str, checkpoints[:2]), "--order", str(bad)))
    missing = _error(capsys, *map(str, checkpoints[:2]), "--order", str(tmp_path / "none.yaml"))
    assert "none.yaml: unreadable" in missing
    partial = tmp_path / "partial.yaml"
    partial.write_text(f"runs: [{CHECKPOINTS[0][0]}]\n", encoding="utf-8")
    assert "does not list run(s)" in _error(capsys, *map(str, checkpoints[:2]), "--order", str(partial))


def test_a_root_whose_files_contradict_its_card(tmp_path, capsys) -> None:
    root = make_run(tmp_path / "r", "stage1-step-40000", 4096, "c" * 16)
    import shutil

    shutil.rmtree(root / "l02h01q")
    line = _error(capsys, str(root), "--out", str(tmp_path / "o"))
    assert "contradict its card" in line and "l02h01q" in line


def test_the_same_run_twice_and_duplicate_labels(checkpoints, tmp_path, capsys) -> None:
    assert "are the same run" in _error(capsys, str(checkpoints[0]), str(checkpoints[0]))
    line = _error(capsys, *map(str, checkpoints[:2]), "--label", "x", "--label", "x")
    assert "label 'x'" in line
    assert "--label given 1 time(s) for 2 run(s)" in _error(capsys, *map(str, checkpoints[:2]), "--label", "x")


def test_order_step_needs_steps(tmp_path) -> None:
    a = make_run(tmp_path / "a", "main", 4096, "d" * 16, heads={0: [0]})
    refs = resolve_runs([str(a)])
    from qkcore.analysis.compare import describe_runs

    with pytest.raises(QkcoreError, match="has no checkpoint step"):
        order_runs(describe_runs(refs, None), "step")


def test_a_plasticity_output_folder_is_a_run(checkpoints, tmp_path, capsys) -> None:
    """An output of ``qkcore plasticity`` compares as the run it records; other settings are one clear error."""
    first, second = checkpoints[1], checkpoints[3]  # stage1-step-40000, stage1-step-1200000
    assert main(["plasticity", str(first), "--out", str(tmp_path / "p"), *FAST]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "p"), str(second), "--out", str(out), *FAST]) == 0
    rows = _rows(out / "head_plasticity.csv")
    assert [r["revision"] for r in rows][:: LAYERS * N_Q] == ["stage1-step-40000", "stage1-step-1200000"]
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert f"reused {tmp_path / 'p'}" in readme and not (out / "runs" / "p").exists()
    assert main(["compare", str(tmp_path / "p"), str(second), "--out", str(tmp_path / "o2"), "--pairs-per-bucket", "64",
                 "--workers", "1", "--no-progress"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "computed with other settings" in line and "pairs_per_bucket: it used 32, this comparison 64" in line
    assert not (tmp_path / "o2").exists()  # refused before anything was computed or written
