"""qkcore plugin for Llama-family models (``model_type: llama``).

Llama attention projects Q/K with ``q_proj``/``k_proj``, applies RoPE on every
layer, and hands the rotated tensors to the attention interface, so the
core's attention-interface capture sees exactly the post-RoPE Q/K. All layers
are full attention; GQA groups are contiguous. All of that is the core's generic
default (``qkcore.generic``): this plugin claims the model type and writes the card note.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkcore import hookimpl
from qkcore.layers import rope_stage

if TYPE_CHECKING:  # pragma: no cover - typing only
    from qkcore.capture import CapturePlan

MODEL_TYPES = ["llama"]


@hookimpl
def qkcore_model_types() -> list[str]:
    return MODEL_TYPES


@hookimpl
def qkcore_card_notes(plan: CapturePlan) -> list[str]:
    stage = rope_stage(plan.pre_rope)
    return [f"Llama: Q/K are the projected query/key states {stage}; all layers are full attention."]
