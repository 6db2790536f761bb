"""Family plugins hold only what differs: where a plugin dropped a hook, the generic answers as it did.

Each removed hook is restated below exactly as the plugin implemented it (its
"old answer"); the family's hooks, now answered by ``qkcore.generic``, must give
the same layers (module, kind, window, head counts), the same RoPE sites and the
same model class on a tiny model of that family.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import pytest
from torch import nn
from transformers import AutoModelForCausalLM

from qkcore.layers import AttentionLayer, RopeSite, self_attention_layers, text_decoder
from qkcore.testing import meta_model, tiny_architecture
from tests.integration.families.test_mllama import MLLAMA


def _layers_from_module_window(model: nn.Module) -> list[AttentionLayer]:
    # llama, qwen2, qwen3, glm, smollm3, gemma3: every self_attn with the window it hands its kernel.
    return self_attention_layers(model)


def _layers_module_or_model_wide_window(model: nn.Module) -> list[AttentionLayer]:
    # ministral: the module's own window where it has one, else the config's model-wide window.
    config = text_decoder(model).config

    def window_of(attention: nn.Module) -> int | None:
        if hasattr(attention, "sliding_window"):
            return attention.sliding_window
        return getattr(config, "sliding_window", None)

    return self_attention_layers(model, window_of)


def _rope_after_projections(model: nn.Module, layer: AttentionLayer) -> RopeSite:
    # llama, qwen2, glm, ministral.
    return RopeSite(applies_rope=True, query_source=layer.module.q_proj, key_source=layer.module.k_proj)


def _rope_after_head_norms(model: nn.Module, layer: AttentionLayer) -> RopeSite:
    # qwen3.
    return RopeSite(applies_rope=True, query_source=layer.module.q_norm, key_source=layer.module.k_norm)


def _rope_unless_config_nope(model: nn.Module, layer: AttentionLayer) -> RopeSite:
    # smollm3: config.no_rope_layers[i] == 0 marks a NoPE layer.
    flags = list(model.config.get_text_config().no_rope_layers)
    return RopeSite(applies_rope=bool(flags[layer.index]), query_source=layer.module.q_proj,
                    key_source=layer.module.k_proj)


def _rope_unless_cross(model: nn.Module, layer: AttentionLayer) -> RopeSite:
    # mllama: self-attention rotates after the projections; cross-attention never rotates.
    module = layer.module
    return RopeSite(applies_rope=layer.kind != "cross", query_source=module.q_proj, key_source=module.k_proj)


GEMMA3_TEXT = tiny_architecture(
    "gemma3_text", query_pre_attn_scalar=24, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
)
MINISTRAL3 = tiny_architecture(
    "ministral3", sliding_window=8, max_position_embeddings=128,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 32, "llama_4_scaling_beta": 0.5},
)

#: plugin -> {hook it no longer implements: the answer it gave}.
REMOVED: dict[str, dict[str, Callable]] = {
    "llama": {"qkcore_attention_layers": _layers_from_module_window, "qkcore_locate_rope": _rope_after_projections},
    "qwen2": {"qkcore_attention_layers": _layers_from_module_window, "qkcore_locate_rope": _rope_after_projections},
    "qwen3": {"qkcore_attention_layers": _layers_from_module_window, "qkcore_locate_rope": _rope_after_head_norms},
    "glm": {"qkcore_attention_layers": _layers_from_module_window, "qkcore_locate_rope": _rope_after_projections},
    "smollm3": {"qkcore_attention_layers": _layers_from_module_window, "qkcore_locate_rope": _rope_unless_config_nope},
    "gemma3": {"qkcore_attention_layers": _layers_from_module_window},
    "ministral": {
        "qkcore_attention_layers": _layers_module_or_model_wide_window,
        "qkcore_locate_rope": _rope_after_projections,
    },
    "mllama": {"qkcore_locate_rope": _rope_unless_cross},
}

#: Tiny models of each family, with the variants its removed hooks told apart: name -> (architecture, plugin).
CASES: dict[str, tuple[dict[str, Any], str]] = {
    "llama": (tiny_architecture("llama"), "llama"),
    "qwen2-sliding": (tiny_architecture("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1),
                      "qwen2"),
    "qwen2-window-off": (tiny_architecture("qwen2", sliding_window=16, max_window_layers=1), "qwen2"),
    "qwen2-layer-types": (tiny_architecture("qwen2", use_sliding_window=True, sliding_window=16,
                                            layer_types=["sliding_attention", "full_attention"]), "qwen2"),
    "qwen3": (tiny_architecture("qwen3"), "qwen3"),
    "qwen3-sliding": (tiny_architecture("qwen3", use_sliding_window=True, sliding_window=16, max_window_layers=1),
                      "qwen3"),
    "glm": (tiny_architecture("glm"), "glm"),
    "glm4": (tiny_architecture("glm4"), "glm"),
    "smollm3-default": (tiny_architecture("smollm3", num_hidden_layers=8), "smollm3"),
    "smollm3-sliding": (tiny_architecture("smollm3", num_hidden_layers=8, use_sliding_window=True, sliding_window=32),
                        "smollm3"),
    "gemma3_text": (GEMMA3_TEXT, "gemma3"),
    "gemma3": ({
        "model_type": "gemma3",
        "text_config": GEMMA3_TEXT,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
        "mm_tokens_per_image": 4,
    }, "gemma3"),
    "ministral3": (MINISTRAL3, "ministral"),
    "ministral": (tiny_architecture("ministral", num_hidden_layers=3, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
                  "ministral"),
    "mistral": (tiny_architecture("mistral", sliding_window=8), "ministral"),
    "mistral-no-window": (tiny_architecture("mistral", sliding_window=None), "ministral"),
    "mistral3": ({
        "model_type": "mistral3",
        "text_config": MINISTRAL3,
        "vision_config": {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
    }, "ministral"),
    "mllama": (MLLAMA, "mllama"),
}


def _described(layers: list[AttentionLayer]) -> list[tuple]:
    return [(layer.index, id(layer.module), layer.kind, layer.sliding_window, layer.num_query_heads,
             layer.num_key_value_heads, layer.head_dim) for layer in layers]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_generic_answers_as_the_removed_plugin_hooks_did(case) -> None:
    architecture, plugin = CASES[case]
    removed = REMOVED[plugin]
    model, family = meta_model(architecture)
    assert family.plugin_name == plugin
    module = importlib.import_module(f"qk_plugin_{plugin}")
    assert [hook for hook in removed if hasattr(module, hook)] == []  # the generic answers these now
    layers = family.hooks.qkcore_attention_layers(model=model)
    if "qkcore_attention_layers" in removed:
        assert _described(layers) == _described(removed["qkcore_attention_layers"](model))
    if "qkcore_locate_rope" in removed:
        old = removed["qkcore_locate_rope"]
        for layer in layers:
            site, expected = family.hooks.qkcore_locate_rope(model=model, layer=layer), old(model, layer)
            assert (site.applies_rope, site.heads_first) == (expected.applies_rope, expected.heads_first), layer.index
            if layer.capturable:  # a cross-attention layer's sources are never hooked
                assert (site.query_source, site.key_source) == (expected.query_source, expected.key_source)


def test_the_generic_model_class_is_the_one_mllama_named() -> None:
    # qk-plugin-mllama named AutoModelForCausalLM (text decoder + LM head, vision weights skipped).
    model, family = meta_model(MLLAMA)
    assert not hasattr(importlib.import_module("qk_plugin_mllama"), "qkcore_model_class")
    assert family.hooks.qkcore_model_class(config=model.config) is AutoModelForCausalLM
    assert type(model).__name__ == "MllamaForCausalLM"
