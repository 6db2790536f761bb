"""qkcore plugin for Qwen2 / Qwen2.5 models (``model_type: qwen2``, ``Qwen2ForCausalLM``).

Qwen2 projects Q/K with biased ``q_proj``/``k_proj`` (the bias is part of the
projection output, hence of the captured rows), applies RoPE on every layer and
hands the rotated tensors to the attention interface. With
``use_sliding_window`` the layers listed as ``"sliding_attention"`` in
``layer_types`` (by default those from ``max_window_layers`` on) attend within
``sliding_window`` tokens; all other layers are full attention.
"""

from __future__ import annotations

from torch import nn

from qkcore import hookimpl
from qkcore.layers import AttentionLayer, RopeSite, self_attention_layers

MODEL_TYPES = ["qwen2"]


@hookimpl
def qkcore_model_types() -> list[str]:
    return MODEL_TYPES


@hookimpl
def qkcore_attention_layers(model: nn.Module) -> list[AttentionLayer]:
    # The module's window is what its kernel call and its mask use: transformers sets
    # config.sliding_window to None unless use_sliding_window, whatever layer_types says.
    return self_attention_layers(model)


@hookimpl
def qkcore_locate_rope(model: nn.Module, layer: AttentionLayer) -> RopeSite:
    # RoPE follows the (biased) projections directly, on every layer.
    return RopeSite(applies_rope=True, query_source=layer.module.q_proj, key_source=layer.module.k_proj)


@hookimpl
def qkcore_card_notes(model: nn.Module, layers: list[AttentionLayer]) -> list[str]:
    # Sliding layers and their windows are listed by the card itself (from the layer kinds).
    return ["Qwen2: Q/K are the biased q_proj/k_proj outputs after rotary embedding."]
