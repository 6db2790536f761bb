"""``qkcore plan``: expected rows, heads, warnings and no weights, checked against independent maths and real runs."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

import qkcore.plan as plan_module
from qkcore.batching import tokenize_batches
from qkcore.config import ConfigError, load_config
from qkcore.plan import (
    build_meta_model,
    DEFAULT_DOCUMENTS,
    THROUGHPUT_TOKENS_PER_S,
    PlanCommand,
    format_plan,
    make_plan,
    throughput_tokens_per_s,
)
from qkcore.plugins import installed_summary, make_plugin_manager, resolve_family
from qkcore.planning import plan_capture
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
    cfg = load_config(tiny_config(capture=UNIFORM))
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
    cfg = load_config(tiny_config(capture=UNIFORM, dataset={"max_samples": 7}))
    assert make_plan(cfg, pm).rows_per_config["l00h00q"] == pytest.approx(7 * per_doc)
    assert make_plan(cfg, pm, documents=3).rows_per_config["l00h00q"] == pytest.approx(3 * per_doc)
    lengths = [0, 5, 100, 10_000]  # the last is truncated to max_length
    expected = sum(_p_keep_uniform(1, 16) * min(n, MAX_LENGTH) for n in lengths)
    assert make_plan(cfg, pm, lengths=lengths).rows_per_config["l02h01k"] == pytest.approx(expected)


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
    command = PlanCommand(pm)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(
        ["--config", str(tiny_config(capture=UNIFORM)), "--set", "capture.layers=[1]", "--lengths", "64,32"]
    )
    assert command.name == "plan" and command.help
    assert command.run(args) == 0
    out = capsys.readouterr().out
    assert "configs: 10 (8 query, 2 key)" in out
    assert "expected rows per config: 6" in out  # (64 + 32) / 16
    assert "uncompressed estimate" in out and "estimate" in out and "H100" in out
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", "x.yaml", "--lengths", "1,-2"])


def test_key_head_of_each_query_head_comes_from_the_family_hook(tiny_config, pm) -> None:
    """The plan records the GQA mapping per query head (the card publishes it for analyses)."""
    cfg = load_config(tiny_config())
    model, family = build_meta_model(cfg, pm)
    plan = plan_capture(model, family, cfg, installed_summary(pm))
    for layer, mapping in plan.key_head_of.items():
        assert sorted(mapping) == plan.heads[(layer, "q")]
        assert mapping == {q: q // 4 for q in mapping}  # tiny Llama: 8 query heads over 2 key heads
        assert sorted(set(mapping.values())) == plan.heads[(layer, "k")]
