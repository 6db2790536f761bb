"""The attention-plasticity protocol configs load, resolve a plugin and describe the real models.

Nothing is downloaded: each model's architecture ships as
``configs/architectures/<org>--<name>.json`` (validation only, see the README
there) and is built on the meta device with the class its plugin picks.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from qkcore.config import SniffConfig, load_config
from qkcore.plugins import make_plugin_manager, resolve_family
from qkcore.planning import plan_capture
from qkcore.sources.model import apply_config_overrides, architecture_config

REPO = Path(__file__).resolve().parents[1]
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
    "Qwen/Qwen3-0.6B": Expected(28, 16, 8, 128, "qwen3"),
    "Qwen/Qwen3-1.7B": Expected(28, 16, 8, 128, "qwen3"),
    "Qwen/Qwen3-4B": Expected(36, 32, 8, 128, "qwen3"),
    "Qwen/Qwen3-8B": Expected(36, 32, 8, 128, "qwen3"),
    "Qwen/Qwen3-14B": Expected(40, 40, 8, 128, "qwen3"),
    "HuggingFaceTB/SmolLM3-3B-checkpoints": Expected(36, 16, 4, 128, "smollm3", nope=tuple(SMOLLM3_NOPE)),
}
#: Plugins being written in parallel with these tests: skip their models until installed.
PLUGIN_MODULES = {"ministral": "qk_plugin_ministral", "mllama": "qk_plugin_mllama"}


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
    model_class = family.hooks.qkcore_model_class(config=config)
    with torch.device("meta"):
        model = model_class.from_config(config)
    return cfg, family, model


def _require_plugin(cfg: SniffConfig) -> Expected:
    expected = EXPECTED[cfg.model.name]
    if expected.plugin in PLUGIN_MODULES:
        pytest.importorskip(PLUGIN_MODULES[expected.plugin])
    return expected


def test_every_protocol_model_has_a_config() -> None:
    names = {load_protocol_config(path).model.name for path in CONFIGS}
    assert names == set(EXPECTED)
    assert len(CONFIGS) == 3 + 3 + 5 + 10


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
    assert cfg.output.hf_branch.endswith("-longbench-pro-128k-plus")
    assert cfg.output.data_root == (Path.cwd() / "data" / "attention-plasticity")
    # One bucket per sixteenth of the context (seed 05): 131072/8192, 4096/256, 32768/2048, 65536/4096.
    assert cfg.tokenizer.max_length // cfg.capture.min_bucket_size == 16
    if cfg.model.name.startswith("HuggingFaceTB/"):
        assert cfg.tokenizer.name == "HuggingFaceTB/SmolLM3-3B"
        assert cfg.output.hf_branch == f"smollm3-3b-{cfg.model.revision}-longbench-pro-128k-plus"
    else:
        assert cfg.model.revision == "main" and cfg.tokenizer.name == cfg.model.name
        assert cfg.tokenizer.max_length == 131072
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
