"""The attention-plasticity protocol configs load, resolve a plugin and describe the real models.

Nothing is downloaded: each model's architecture ships as
``configs/architectures/<org>--<name>.json`` (validation only, see the README
there) and is built on the meta device with the class its plugin picks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from qkcore.config import SniffConfig, load_config
from qkcore.plugins import make_plugin_manager, resolve_family
from qkcore.meta_model import on_meta_device
from qkcore.stages.plan import plan_capture
from qkcore.sources.model import apply_config_overrides, architecture_config

REPO = Path(__file__).resolve().parents[2]
PROTOCOL = REPO / "configs" / "attention-plasticity"
ARCHITECTURES = REPO / "configs" / "architectures"
CONFIGS = sorted(PROTOCOL.rglob("*.yaml"))

#: SmolLM3 checkpoint branches by training stage -> the architecture of that context stage.
SMOLLM3_STAGES = {
    "stage1": "stages-1-3",
    "stage2": "stages-1-3",
    "stage3": "stages-1-3",
    "lc-4k-to-32k": "lc-4k-to-32k",
    "lc-32k-to-64k": "lc-32k-to-64k",
}
SMOLLM3_NOPE = list(range(3, 36, 4))  # seed 05: layers 3, 7, ..., 35


@dataclass(frozen=True)
class Expected:
    """What the model cards (and seeds 01/05) say about each model's attention."""

    layers: int
    query_heads: int
    key_value_heads: int
    head_dim: int
    plugin: str
    cross: tuple[int, ...] = ()
    nope: tuple[int, ...] = ()


EXPECTED: dict[str, Expected] = {
    "mistralai/Ministral-3-3B-Base-2512": Expected(26, 32, 8, 128, "ministral"),
    "mistralai/Ministral-3-8B-Base-2512": Expected(34, 32, 8, 128, "ministral"),
    "mistralai/Ministral-3-14B-Base-2512": Expected(40, 32, 8, 128, "ministral"),
    "meta-llama/Llama-3.2-1B": Expected(16, 32, 8, 64, "llama"),
    "meta-llama/Llama-3.2-3B": Expected(28, 24, 8, 128, "llama"),
    "meta-llama/Llama-3.2-11B-Vision": Expected(40, 32, 8, 128, "mllama", cross=(3, 8, 13, 18, 23, 28, 33, 38)),
    "meta-llama/Llama-3.1-8B": Expected(32, 32, 8, 128, "llama"),
    "mistralai/Mistral-7B-Instruct-v0.2": Expected(32, 32, 8, 128, "ministral"),
    "Qwen/Qwen3-0.6B": Expected(28, 16, 8, 128, "qwen3"),
    "Qwen/Qwen3-1.7B": Expected(28, 16, 8, 128, "qwen3"),
    "Qwen/Qwen3-4B": Expected(36, 32, 8, 128, "qwen3"),
    "Qwen/Qwen3-8B": Expected(36, 32, 8, 128, "qwen3"),
    "Qwen/Qwen3-14B": Expected(40, 40, 8, 128, "qwen3"),
    "HuggingFaceTB/SmolLM3-3B-checkpoints": Expected(36, 16, 4, 128, "smollm3", nope=tuple(SMOLLM3_NOPE)),
}
#: Plugins being written in parallel with these tests: skip their models until installed.
PLUGIN_MODULES = {"ministral": "qk_plugin_ministral", "mllama": "qk_plugin_mllama"}

#: The heads the original sniff-qk selects for each config, computed by running its own
#: ``resolve_head_filters`` on these architectures (meta device) and keeping the heads it
#: captures (none on cross-attention layers): (query configs, key configs, digest), the
#: digest being sha256 of the JSON list of sorted ``[layer, head, "q"|"k"]``, first 16 hex
#: digits. Llama-3.2-11B-Vision matches with ``candidates: all_decoder_layers`` only.
ORIGINAL_SELECTION: dict[str, tuple[int, int, str]] = {
    "llama3.1-8b.yaml": (300, 187, "2b20ea8f0c60f84d"),
    "llama3.2-11b.yaml": (239, 157, "e7e90e8ad12e2aa1"),
    "llama3.2-1b.yaml": (300, 123, "bdc64c1efd58fce5"),
    "llama3.2-3b.yaml": (300, 188, "006af6bf01efe869"),
    "ministral3-14b.yaml": (300, 201, "fd5ebd725edc1c97"),
    "ministral3-3b.yaml": (300, 167, "baf7bb645f753320"),
    "ministral3-8b.yaml": (300, 189, "1e6e8494ab262cec"),
    "mistral-v0.2-7b.yaml": (300, 187, "2b20ea8f0c60f84d"),
    "qwen3-0.6b.yaml": (300, 200, "0d68883ce7ec583b"),
    "qwen3-1.7b.yaml": (300, 200, "0d68883ce7ec583b"),
    "qwen3-14b.yaml": (300, 194, "8a951e1375de5b40"),
    "qwen3-4b.yaml": (300, 194, "c617c3bc51b72d02"),
    "qwen3-8b.yaml": (300, 194, "c617c3bc51b72d02"),
    **{
        f"smollm3-checkpoints/{name}.yaml": (300, 136, "3d889da53bc4a265")
        for name in (
            "lc-32k-to-64k-step-20000", "lc-32k-to-64k-step-4000", "lc-4k-to-32k-step-20000",
            "lc-4k-to-32k-step-4000", "stage1-step-1200000", "stage1-step-2400000", "stage1-step-3440000",
            "stage1-step-40000", "stage2-step-4200000", "stage3-step-4720000",
        )
    },
}


def _id(path: Path) -> str:
    return str(path.relative_to(PROTOCOL))


def load_protocol_config(path: Path) -> SniffConfig:
    """Load with every warning turned into an error (the configs must load cleanly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_config(path, env={})


def architecture_path(cfg: SniffConfig) -> Path:
    stem = cfg.model.name.replace("/", "--")
    if cfg.model.name == "HuggingFaceTB/SmolLM3-3B-checkpoints":
        stage = cfg.model.revision.rsplit("-step-", 1)[0]
        stem += "--" + SMOLLM3_STAGES[stage]
    return ARCHITECTURES / f"{stem}.json"


def build_config(cfg: SniffConfig) -> Any:
    """The architecture config with the run's ``config_overrides`` applied, as a run would see it."""
    config = architecture_config(str(architecture_path(cfg)))
    apply_config_overrides(config, cfg.model.config_overrides)
    return config


@functools.lru_cache(maxsize=None)
def _meta_model(path: Path):
    cfg = load_protocol_config(path)
    config = build_config(cfg)
    family = resolve_family(make_plugin_manager(), config.model_type)
    return cfg, family, on_meta_device(config, family)


def _require_plugin(cfg: SniffConfig) -> Expected:
    expected = EXPECTED[cfg.model.name]
    if expected.plugin in PLUGIN_MODULES:
        pytest.importorskip(PLUGIN_MODULES[expected.plugin])
    return expected


def test_every_protocol_model_has_a_config() -> None:
    names = {load_protocol_config(path).model.name for path in CONFIGS}
    assert names == set(EXPECTED)
    assert len(CONFIGS) == 3 + 3 + 1 + 1 + 5 + 10
    assert {_id(path) for path in CONFIGS} == set(ORIGINAL_SELECTION)


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_config_follows_the_fixed_capture_setup(path: Path) -> None:
    cfg = load_protocol_config(path)
    text = path.read_text(encoding="utf-8")
    assert "capture_pre_rope: false" in text and cfg.capture.capture_pre_rope is False
    assert cfg.dataset.path == "viktoroo/longbench-pro-128k-plus" and cfg.dataset.split == "test"
    assert (cfg.dataset.text_column, cfg.dataset.id_column) == ("text", "id")
    assert cfg.capture.sampler.type == "uniform" and cfg.capture.sampler.base_rate == 1.0
    assert cfg.capture.head_sampling.count == 300 and cfg.capture.head_sampling.seed == 0
    assert cfg.capture.full_attention_only and cfg.capture.capture_queries and cfg.capture.capture_keys
    assert cfg.capture.layers is None and cfg.capture.heads is None
    assert (cfg.model.dtype, cfg.inference.autocast_dtype, cfg.inference.batch_size) == ("bfloat16", "bfloat16", 1)
    assert cfg.tokenizer.padding == "longest"
    assert cfg.output.hf_repo_id == "viktoroo/sniffed-qk"
    assert cfg.output.data_root == (Path.cwd() / "data" / "attention-plasticity")
    if cfg.model.name.startswith("mistralai/Mistral-7B"):
        # The original's Mistral v0.2 config: its whole 32768-token context, 8192-token buckets (4, not 16).
        assert (cfg.tokenizer.max_length, cfg.capture.min_bucket_size) == (32768, 8192)
    else:
        # One bucket per sixteenth of the context (seed 05): 131072/8192, 4096/256, 32768/2048, 65536/4096.
        assert cfg.tokenizer.max_length // cfg.capture.min_bucket_size == 16
    if cfg.model.name.startswith("HuggingFaceTB/"):
        assert cfg.tokenizer.name == "HuggingFaceTB/SmolLM3-3B"
        assert cfg.output.hf_branch == f"smollm3-3b-{cfg.model.revision}-longbench-pro-128k-plus"
    else:
        assert cfg.model.revision == "main" and cfg.tokenizer.name == cfg.model.name
        assert cfg.tokenizer.max_length == (32768 if "Mistral-7B" in cfg.model.name else 131072)
        # The published datasets' branches: the original tool names them after its config files.
        assert cfg.output.hf_branch == f"{path.stem}-longbench-pro-128k-plus"
    if cfg.model.name.startswith("Qwen/"):
        assert cfg.model.config_overrides == {
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
        }
    else:
        assert cfg.model.config_overrides is None


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_architecture_resolves_to_its_plugin(path: Path) -> None:
    cfg = load_protocol_config(path)
    expected = _require_plugin(cfg)
    config = build_config(cfg)
    family = resolve_family(make_plugin_manager(), config.model_type)
    assert not family.is_fallback
    assert family.plugin_name == expected.plugin


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_layer_description_matches_the_model(path: Path) -> None:
    expected = _require_plugin(load_protocol_config(path))
    cfg, family, model = _meta_model(path)
    layers = family.hooks.qkcore_attention_layers(model=model)
    assert [layer.index for layer in layers] == list(range(expected.layers))
    assert [layer.index for layer in layers if layer.kind == "cross"] == list(expected.cross)
    self_attention = [layer for layer in layers if layer.kind != "cross"]
    assert all(layer.kind == "full" and layer.sliding_window is None for layer in self_attention)
    assert {(layer.num_query_heads, layer.num_key_value_heads, layer.head_dim) for layer in self_attention} == {
        (expected.query_heads, expected.key_value_heads, expected.head_dim)
    }
    plan = plan_capture(model, family, cfg)
    nope = [index for index, site in plan.rope_sites.items() if not site.applies_rope and index not in expected.cross]
    assert nope == list(expected.nope)
    # 300 query heads, sampled from full-attention layers only, with their GQA key heads.
    assert sum(len(heads) for (_, kind), heads in plan.heads.items() if kind == "q") == 300
    assert not set(plan.layers) & set(expected.cross)
    group = expected.query_heads // expected.key_value_heads
    for (index, kind), heads in plan.heads.items():
        if kind == "k":
            assert heads == sorted({q // group for q in plan.heads[(index, "q")]})


@pytest.mark.parametrize("path", [p for p in CONFIGS if "qwen3" in p.name], ids=_id)
def test_qwen3_overrides_give_yarn_over_the_protocol_context(path: Path) -> None:
    cfg = load_protocol_config(path)
    config = build_config(cfg)
    rope = config.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("yarn", 4.0, 1000000)
    assert rope["original_max_position_embeddings"] * rope["factor"] == cfg.tokenizer.max_length
    _, _, model = _meta_model(path)
    assert model.model.rotary_emb.rope_type == "yarn"
    assert model.model.rotary_emb.attention_scaling == pytest.approx(1 + 0.1 * torch.log(torch.tensor(4.0)).item())


@pytest.mark.parametrize("path", sorted((PROTOCOL / "smollm3-checkpoints").glob("*.yaml")), ids=_id)
def test_smollm3_context_stage_matches_tokenizer_length(path: Path) -> None:
    cfg = load_protocol_config(path)
    spec = json.loads(architecture_path(cfg).read_text(encoding="utf-8"))
    # Seed 05: stages 1-3 at 4k / theta 5e4, then 32k / 2e6 and 64k / 5e6.
    theta = {4096: 50000.0, 32768: 2000000.0, 65536: 5000000.0}[cfg.tokenizer.max_length]
    assert (spec["max_position_embeddings"], spec["rope_theta"]) == (cfg.tokenizer.max_length, theta)
    assert [i for i, flag in enumerate(spec["no_rope_layers"]) if not flag] == SMOLLM3_NOPE


def _selected(plan) -> tuple[int, int, str]:  # type: ignore[no-untyped-def]
    """(query configs, key configs, digest) of a plan, as :data:`ORIGINAL_SELECTION` spells them."""
    triples = sorted((layer, head, kind) for (layer, kind), heads in plan.heads.items() for head in heads)
    digest = hashlib.sha256(json.dumps(triples).encode()).hexdigest()[:16]
    n_q = sum(1 for _, _, kind in triples if kind == "q")
    return n_q, len(triples) - n_q, digest


def _with_candidates(cfg: SniffConfig, rule: str) -> SniffConfig:
    sampling = cfg.capture.head_sampling.model_copy(update={"candidates": rule})
    return cfg.model_copy(update={"capture": cfg.capture.model_copy(update={"head_sampling": sampling})})


@pytest.mark.parametrize("path", CONFIGS, ids=_id)
def test_head_selection_matches_the_original_tool(path: Path) -> None:
    _require_plugin(load_protocol_config(path))
    cfg, family, model = _meta_model(path)
    original = ORIGINAL_SELECTION[_id(path)]
    plan = plan_capture(model, family, _with_candidates(cfg, "all_decoder_layers"))
    assert _selected(plan) == original
    default = plan_capture(model, family, cfg)
    if EXPECTED[cfg.model.name].cross:
        # Only Llama 3.2 Vision differs by default; its plan says how to get the original's heads.
        assert _selected(default)[0] == 300 and _selected(default) != original
        assert "candidates: all_decoder_layers" in default.head_selection_note
    else:
        assert _selected(default) == original and default.head_selection_note is None


def test_llama_vision_original_candidates_at_the_real_shape() -> None:
    path = PROTOCOL / "llama3.2-11b.yaml"
    _require_plugin(load_protocol_config(path))
    cfg, family, model = _meta_model(path)
    default = plan_capture(model, family, cfg)
    original = plan_capture(model, family, _with_candidates(cfg, "all_decoder_layers"))

    def query_pairs(plan) -> set[tuple[int, int]]:  # type: ignore[no-untyped-def]
        return {(layer, head) for (layer, kind), heads in plan.heads.items() if kind == "q" for head in heads}

    assert len(query_pairs(default)) == 300 and len(query_pairs(original)) == 239
    assert len(query_pairs(default) & query_pairs(original)) == 75
    # The original's first picks (its resolve_head_filters, seed 0): layers 0-5, layer 3 being cross-attention.
    assert {layer: original.heads[(layer, "q")] for layer in (0, 1, 2, 4, 5)} == {
        0: [0, 2, 3, 4, 6, 18, 25, 27, 28, 29, 30],
        1: [1, 6, 12, 14, 22],
        2: [0, 3, 9, 10, 15, 16, 18, 19, 20, 22, 28, 29, 31],
        4: [0, 2, 13, 15, 17, 19, 23],
        5: [1, 4, 5, 6, 8, 10, 23, 26, 27, 31],
    }
    assert original.heads[(0, "k")] == [0, 1, 4, 6, 7]
    # Its first eight draws, in draw order (none on a cross-attention layer), are all captured.
    first_draws = [(24, 20), (26, 29), (2, 18), (16, 18), (32, 23), (31, 3), (25, 29), (19, 13)]
    assert all(head in original.heads[(layer, "q")] for layer, head in first_draws)
    assert (3, "q") not in original.heads  # its 5 picks there (heads 2, 6, 22, 29, 31) are not captured
    assert original.head_selection == (
        "300 of 1280 candidate query heads of all 40 decoder layers, cross-attention included as in the original "
        "sniff-qk, picked by random.Random(0).sample (capture.head_sampling.candidates: all_decoder_layers); "
        "61 picks on cross-attention layers are not captured, leaving 239 query heads"
    )
    assert original.head_selection_note is None
    assert default.head_selection == (
        "300 of 1024 candidate query heads of the 32 eligible layers, picked by random.Random(0).sample "
        "(capture.head_sampling.candidates: eligible_layers)"
    )


def test_plan_points_llama_vision_to_the_original_setting(capsys) -> None:
    from qkcore.cli import main

    path = PROTOCOL / "llama3.2-11b.yaml"
    _require_plugin(load_protocol_config(path))
    architecture = architecture_path(load_protocol_config(path))
    args = ["plan", "--config", str(path), "--set", f"model.config={architecture}", "--documents", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "configs: 487 (300 query, 187 key)" in out
    assert (
        "NOTE: the original sniff-qk samples these heads over all decoder layers, cross-attention included, and "
        "captures 239 query heads here (75 in common with the 300 chosen now): set "
        "capture.head_sampling.candidates: all_decoder_layers to reproduce its published datasets"
    ) in out
    args += ["--set", "capture.head_sampling.candidates=all_decoder_layers"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "configs: 396 (239 query, 157 key)" in out and "NOTE:" not in out
    assert "61 picks on cross-attention layers are not captured, leaving 239 query heads" in out
