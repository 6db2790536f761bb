"""qkcore plugin for Llama-family models (``model_type: llama``).

Llama attention projects Q/K with ``q_proj``/``k_proj``, applies RoPE on every
layer, and hands the rotated tensors to the attention interface, so the
core's attention-interface capture sees exactly the post-RoPE Q/K. All layers
are full attention; GQA groups are contiguous (the core's default mapping).
"""

from __future__ import annotations

from torch import nn

from qkcore import hookimpl
from qkcore.layers import AttentionLayer, RopeSite, self_attention_layers

MODEL_TYPES = ["llama"]


@hookimpl
def qkcore_model_types() -> list[str]:
    return MODEL_TYPES


@hookimpl
def qkcore_attention_layers(model: nn.Module) -> list[AttentionLayer]:
    # Llama attention has no window: every layer is full attention.
    return self_attention_layers(model)


@hookimpl
def qkcore_locate_rope(model: nn.Module, layer: AttentionLayer) -> RopeSite:
    # RoPE is applied right after the projections, on every Llama layer.
    return RopeSite(applies_rope=True, query_source=layer.module.q_proj, key_source=layer.module.k_proj)


@hookimpl
def qkcore_card_notes(model: nn.Module, layers: list[AttentionLayer]) -> list[str]:
    return ["Llama: Q/K are the projected query/key states after rotary embedding; all layers are full attention."]
