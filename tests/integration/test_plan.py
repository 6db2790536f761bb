"""``qkcore plan``: expected rows, heads, warnings and no weights, checked against independent maths and real runs."""

from __future__ import annotations

import math

import click
import pytest
import torch

import qkcore.estimate as plan_module
from qkcore.batching import tokenize_batches
from qkcore.cli import QkcoreCli, main
from qkcore.config import ConfigError, load_config
from qkcore.estimate import (
    build_meta_model,
    DEFAULT_DOCUMENTS,
    disk_needed_bytes,
    THROUGHPUT_TOKENS_PER_S,
    format_plan,
    make_plan,
    throughput_tokens_per_s,
)
from qkcore.plugins import installed_summary, make_plugin_manager, resolve_family
from qkcore.stages.plan import plan_capture
from qkcore.sniff import run_sniff
from qkcore.sources.documents import iter_documents, open_dataset
from qkcore.sources.model import load_architecture, load_model
from qkcore.sources.tokenizer import load_tokenizer
from tests.conftest import TINY_LLAMA

UNIFORM = {"sampler": {"type": "uniform", "base_rate": 1}, "min_bucket_size": 16}
MAX_LENGTH = 512  # the tiny_config default


@pytest.fixture(scope="module")
def pm():
    return make_plugin_manager()


def _p_keep_uniform(base_rate: float, min_bucket_size: int) -> float:
    return min(1.0, base_rate / max(1, min_bucket_size))


def _p_keep_log_uniform(p: int, base_rate: float, min_bucket_size: int) -> float:
    bucket = max(math.floor(math.log2(p + 1)), math.ceil(math.log2(min_bucket_size)))
    return min(1.0, base_rate / 2**bucket)


def _configs(capture_heads: dict[tuple[int, str], list[int]]) -> set[str]:
    return {f"l{layer:02d}h{head:02d}{kind}" for (layer, kind), heads in capture_heads.items() for head in heads}


def test_expected_rows_match_the_sum_of_keep_probabilities(tiny_config, pm) -> None:
    # A Hub dataset is not read: N documents of max_length are assumed.
    cfg = load_config(tiny_config(capture=UNIFORM, dataset={"path": "owner/hub-dataset"}))
    plan = make_plan(cfg, pm)
    per_doc = sum(_p_keep_uniform(1, 16) for _ in range(MAX_LENGTH))
    assert plan.documents == DEFAULT_DOCUMENTS  # max_samples is null in the fixture
    n_configs = TINY_LLAMA["num_hidden_layers"] * (TINY_LLAMA["num_attention_heads"] + TINY_LLAMA["num_key_value_heads"])
    assert len(plan.rows_per_config) == n_configs
    for rows in plan.rows_per_config.values():
        assert rows == pytest.approx(per_doc * DEFAULT_DOCUMENTS, rel=1e-12)
    assert plan.total_rows == pytest.approx(per_doc * DEFAULT_DOCUMENTS * n_configs, rel=1e-12)
    assert plan.disk_bytes == pytest.approx(plan.total_rows * (TINY_LLAMA["head_dim"] * 4 + 16), rel=1e-12)
    assert plan.warnings == []

    # max_samples, --documents and --lengths each set the documents.
    cfg = load_config(tiny_config(capture=UNIFORM, dataset={"path": "owner/hub-dataset", "max_samples": 7}))
    assert make_plan(cfg, pm).rows_per_config["l00h00q"] == pytest.approx(7 * per_doc)
    assert make_plan(cfg, pm, documents=3).rows_per_config["l00h00q"] == pytest.approx(3 * per_doc)
    lengths = [0, 5, 100, 10_000]  # the last is truncated to max_length
    expected = sum(_p_keep_uniform(1, 16) * min(n, MAX_LENGTH) for n in lengths)
    assert make_plan(cfg, pm, lengths=lengths).rows_per_config["l02h01k"] == pytest.approx(expected)


def _corpus(n: int) -> list[tuple[str, str]]:
    """``n`` documents of different lengths, some longer than MAX_LENGTH bytes."""
    return [(f"doc-{i}", ("word " * (7 * i + 3)).strip()) for i in range(n)]


def test_a_local_dataset_is_counted_and_tokenised(tmp_path, pm) -> None:
    """30 local documents were planned as 500 × max_length (21x too many rows); now they are measured."""
    from tests.conftest import make_config, write_corpus

    texts = _corpus(30)
    config = make_config(tmp_path, capture=UNIFORM)
    write_corpus(tmp_path / "corpus.jsonl", texts)
    plan = make_plan(load_config(config), pm)
    lengths = [min(len(text.encode()), MAX_LENGTH) for _, text in texts]  # the byte tokenizer: one token per byte
    assert plan.documents == 30 and plan.tokens == sum(lengths)
    assert "30 documents in" in plan.lengths_note and "(counted)" in plan.lengths_note
    for rows in plan.rows_per_config.values():
        assert rows == pytest.approx(sum(lengths) * _p_keep_uniform(1, 16), rel=1e-12)
    # max_samples limits what is read, as in a run.
    capped = make_config(tmp_path, capture=UNIFORM, dataset={"max_samples": 4})
    write_corpus(tmp_path / "corpus.jsonl", texts)  # make_config wrote its own corpus
    plan = make_plan(load_config(capped), pm)
    assert plan.documents == 4 and plan.tokens == sum(lengths[:4])


def test_a_large_local_dataset_is_sampled_evenly_and_scaled(tmp_path, pm) -> None:
    from tests.conftest import make_config, write_corpus

    texts = _corpus(10)
    config = make_config(tmp_path, capture=UNIFORM)
    write_corpus(tmp_path / "corpus.jsonl", texts)
    plan = make_plan(load_config(config), pm, sample=4)
    step = 3  # ceil(10 / 4): documents 0, 3, 6, 9
    measured = [min(len(texts[i][1].encode()), MAX_LENGTH) for i in range(0, 10, step)]
    assert plan.documents == 10
    assert plan.tokens == round(sum(measured) * 10 / 4)
    assert "lengths from 4 of them (one in 3, scaled" in plan.lengths_note
    assert plan.rows_per_config["l00h00q"] == pytest.approx(sum(measured) * 10 / 4 * _p_keep_uniform(1, 16))


def test_an_unloadable_tokenizer_is_a_warning_in_the_plan(tmp_path, pm) -> None:
    from tests.conftest import make_config

    cfg = load_config(make_config(tmp_path, capture=UNIFORM, tokenizer={"name": str(tmp_path / "no-tokenizer")}))
    plan = make_plan(cfg, pm)
    assert plan.documents == 5 and plan.tokens == 5 * MAX_LENGTH
    assert any(w.startswith("WARNING tokenizer:") and "no directory" in w for w in plan.warnings)


def test_log_uniform_rows_match_the_rule_position_by_position(tiny_config, pm) -> None:
    capture = {"sampler": {"type": "log_uniform", "base_rate": 4}, "min_bucket_size": 16}
    cfg = load_config(tiny_config(capture=capture))
    lengths = [1, 17, 300, 512]
    plan = make_plan(cfg, pm, lengths=lengths)
    expected = sum(_p_keep_log_uniform(p, 4, 16) for n in lengths for p in range(n))
    assert plan.rows_per_config and all(
        rows == pytest.approx(expected, rel=1e-12) for rows in plan.rows_per_config.values()
    )


def test_heads_equal_plan_capture_on_a_real_model(tiny_config, pm) -> None:
    capture = {**UNIFORM, "head_sampling": {"count": 7, "seed": 3}, "layers": [0, 2]}
    cfg = load_config(tiny_config(capture=capture))
    plan = make_plan(cfg, pm)

    config = load_architecture(cfg.model)
    family = resolve_family(pm, config.model_type)
    model_class = family.hooks.qkcore_model_class(config=config)
    model = load_model(cfg.model, config, model_class, torch.float32, torch.device("cpu"))
    real = plan_capture(model, family, cfg, installed_summary(pm))

    assert plan.heads == real.heads
    assert set(plan.rows_per_config) == _configs(real.heads)
    assert [layer.index for layer in plan.layers] == [0, 1, 2]
    assert [layer.eligible for layer in plan.layers] == [True, False, True]
    for layer in plan.layers:
        assert layer.query_heads == real.heads.get((layer.index, "q"), [])
        assert layer.key_heads == real.heads.get((layer.index, "k"), [])
        assert layer.applies_rope and layer.kind == "full" and layer.sliding_window is None


def test_no_weights_are_materialised(tiny_config, pm, monkeypatch) -> None:
    seen = []

    def spying_plan_capture(model, *args, **kwargs):
        seen.append(model)
        return plan_capture(model, *args, **kwargs)

    monkeypatch.setattr(plan_module, "plan_capture", spying_plan_capture)
    plan = make_plan(load_config(tiny_config(capture=UNIFORM)), pm)
    (model,) = seen
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    emb = TINY_LLAMA["vocab_size"] * TINY_LLAMA["hidden_size"]
    assert plan.non_embedding_params == sum(p.numel() for p in model.parameters()) - 2 * emb


def test_zero_rows_warning(tiny_config, pm) -> None:
    cfg = load_config(tiny_config(capture={"sampler": {"type": "uniform", "base_rate": 1e-6}, "min_bucket_size": 16}))
    plan = make_plan(cfg, pm)
    assert all(rows < 1 for rows in plan.rows_per_config.values())
    assert any(w.startswith("WARNING zero rows") for w in plan.warnings)
    text = format_plan(plan)
    assert any(line.startswith("WARNING zero rows") for line in text.splitlines())
    assert not any("1 TB" in w for w in plan.warnings)


def test_disk_warning_over_one_terabyte(tiny_config, pm) -> None:
    cfg = load_config(tiny_config())  # sampler "all"
    plan = make_plan(cfg, pm, documents=10**12)  # lengths are kept as a histogram, never a list
    assert plan.disk_bytes > 1e12
    assert any(w.startswith("WARNING") and "1 TB" in w for w in plan.warnings)
    assert not any("zero rows" in w for w in plan.warnings)
    assert any(line.startswith("WARNING") for line in format_plan(plan).splitlines())


def test_unknown_sampler_is_a_config_error(tiny_config, pm) -> None:
    cfg = load_config(tiny_config(capture={"sampler": {"type": "no_such_sampler"}}))
    with pytest.raises(ConfigError, match="no_such_sampler"):
        make_plan(cfg, pm)


def test_plan_predicts_a_real_all_sampler_run_exactly(tiny_config, pm) -> None:
    cfg = load_config(tiny_config(capture={"head_sampling": {"count": 4, "seed": 1}}))
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    batches = tokenize_batches(
        iter_documents(open_dataset(cfg.dataset), cfg.dataset), tokenizer,
        max_length=cfg.tokenizer.max_length, batch_size=cfg.inference.batch_size,
    )
    lengths = [n for batch in batches for n in batch.lengths]
    plan = make_plan(cfg, pm, lengths=lengths)
    result = run_sniff(cfg, pm)
    assert set(result.rows) == set(plan.rows_per_config)
    for name, rows in result.rows.items():
        assert rows == plan.rows_per_config[name] == sum(lengths)
    assert plan.tokens == result.tokens


def test_throughput_table_reproduces_its_measurements() -> None:
    ((device, reference), table), = THROUGHPUT_TOKENS_PER_S.items()
    for length, rate in table.items():
        assert throughput_tokens_per_s(reference, length, device) == pytest.approx(rate)
        assert throughput_tokens_per_s(reference * 2, length, device) == pytest.approx(rate / 2)
    between = throughput_tokens_per_s(reference, 8192, device)
    assert table[32_768] < between < table[4_096]


def test_plan_command_prints_the_plan(tiny_config, pm, capsys) -> None:
    cli = QkcoreCli(pm)
    command = cli.get_command(click.Context(cli), "plan")
    args = ["--config", str(tiny_config(capture=UNIFORM)), "--set", "capture.layers=[1]", "--set", "model.device_map=cuda",
            "--lengths", "64,32"]
    assert command.name == "plan" and command.help
    assert main(["plan", *args], pm=pm) == 0
    out = capsys.readouterr().out
    assert "configs: 10 (8 query, 2 key)" in out
    assert "expected rows per config: 6" in out  # (64 + 32) / 16
    assert "uncompressed estimate" in out and "free disk needed while writing" in out
    assert "on one H100: an estimate, not measured" in out and "bare forward (no capture)" in out
    assert main(["plan", "--config", "x.yaml", "--lengths", "1,-2"], pm=pm) == 2  # a usage error, before any work
    assert "qkcore: error: plan: Invalid value for '--lengths'" in capsys.readouterr().err


def test_key_head_of_each_query_head_comes_from_the_family_hook(tiny_config, pm) -> None:
    """The plan records the GQA mapping per query head (the card publishes it for analyses)."""
    cfg = load_config(tiny_config())
    model, family = build_meta_model(cfg, pm)
    plan = plan_capture(model, family, cfg, installed_summary(pm))
    for layer, mapping in plan.key_head_of.items():
        assert sorted(mapping) == plan.heads[(layer, "q")]
        assert mapping == {q: q // 4 for q in mapping}  # tiny Llama: 8 query heads over 2 key heads
        assert sorted(set(mapping.values())) == plan.heads[(layer, "k")]


def test_the_gpu_time_is_an_estimate_for_an_h100_whatever_this_machine_has(tiny_config, pm, monkeypatch) -> None:
    cfg = load_config(tiny_config(capture=UNIFORM), overrides=["model.device_map=auto"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    gpu_line = next(line for line in format_plan(make_plan(cfg, pm)).splitlines() if line.startswith("GPU time"))
    assert "on one H100: an estimate, not measured (this machine has no GPU)" in gpu_line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA A10G")
    gpu_line = next(line for line in format_plan(make_plan(cfg, pm)).splitlines() if line.startswith("GPU time"))
    assert "an estimate, not measured (this machine has NVIDIA A10G)" in gpu_line


@pytest.mark.parametrize("device_map", ["cpu", "mps"])
def test_no_gpu_time_estimate_for_a_device_without_figures(device_map, tiny_config, pm) -> None:
    # A CPU run is not an H100 run: "GPU time ~<0.1 s on one H100" would be a wrong answer, not an estimate.
    cfg = load_config(tiny_config(capture=UNIFORM), overrides=[f"model.device_map={device_map}"])
    plan = make_plan(cfg, pm)
    text = format_plan(plan)
    assert plan.gpu_seconds is None and "H100:" not in text and "basis:" not in text
    assert f"GPU time: no estimate for model.device_map '{device_map}'" in text
    cuda = make_plan(load_config(tiny_config(capture=UNIFORM), overrides=["model.device_map=cuda:0"]), pm)
    assert cuda.gpu_seconds is not None and cuda.gpu_seconds > 0


@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_disk_needed_covers_the_staging_parts_and_the_final_files(tmp_path, head_dim) -> None:
    """Feed the real writer as a run does (a commit per document) and compare its peak with the bound."""
    import numpy as np

    from qkcore.writer import CapturedChunk, DatasetWriter

    rng = np.random.default_rng(head_dim)
    heads, documents, rows_per_doc = 6, 24, 40
    writer = DatasetWriter(tmp_path / "staging", run_key="disk")
    for doc in range(documents):
        positions = np.sort(rng.choice(4096, size=rows_per_doc, replace=False))
        writer.add(CapturedChunk(
            layer=0, kind="q", heads=list(range(heads)), example_ids=np.full(rows_per_doc, doc, dtype=np.int64),
            positions=positions, buckets=np.zeros(rows_per_doc, dtype=np.int64),
            vectors=rng.normal(size=(heads, rows_per_doc, head_dim)).astype(np.float32), sliding_window=None,
        ))
        writer.commit({"doc": doc})
    parts = sum(p.stat().st_size for p in (tmp_path / "staging").glob("*.arrow"))
    rows = {name: stats.rows for name, stats in writer.write_final_files(tmp_path / "out").items()}  # parts still there
    finals = sum(p.stat().st_size for p in (tmp_path / "out").glob("*/data.parquet"))
    needed = disk_needed_bytes({name: float(n) for name, n in rows.items()}, head_dim, spills=documents)
    assert parts + finals <= needed <= 1.3 * (parts + finals), (parts, finals, needed)
    # Without counting the spills the small parts would be missed at small head_dim.
    assert disk_needed_bytes({name: float(n) for name, n in rows.items()}, head_dim, spills=1) < needed


def test_plan_offline_on_a_protocol_config_fails_at_once_and_names_the_offline_route(pm, capsys, monkeypatch) -> None:
    # No Hub (as every test runs): one line naming the architecture file the README's offline route uses.
    import time

    from huggingface_hub import constants

    from tests.conftest import REPO

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(REPO)
    started = time.monotonic()
    assert main(["plan", "--config", "configs/attention-plasticity/qwen3-8b.yaml"], pm=pm) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qkcore: error: model.name: "), err
    assert "no Hub repo 'Qwen/Qwen3-8B'" in err
    assert err.rstrip().endswith("--set model.config=configs/architectures/Qwen--Qwen3-8B.json"), err
    assert time.monotonic() - started < 20
