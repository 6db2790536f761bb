"""qkcore plugin for Qwen2 / Qwen2.5 models (``model_type: qwen2``, ``Qwen2ForCausalLM``).

Qwen2 projects Q/K with biased ``q_proj``/``k_proj`` (the bias is part of the
projection output, hence of the captured rows), applies RoPE on every layer and
hands the rotated tensors to the attention interface. With
``use_sliding_window`` the layers listed as ``"sliding_attention"`` in
``layer_types`` (by default those from ``max_window_layers`` on) attend within
``sliding_window`` tokens; all other layers are full attention. The generic default
(``qkcore.generic``) lists the layers with the window each module hands its kernel
(``config.sliding_window`` is None unless ``use_sliding_window``, whatever
``layer_types`` says) and captures after the projections; this plugin adds the card note.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkcore import hookimpl
from qkcore.layers import rope_stage

if TYPE_CHECKING:  # pragma: no cover - typing only
    from qkcore.capture import CapturePlan

MODEL_TYPES = ["qwen2"]


@hookimpl
def qkcore_model_types() -> list[str]:
    return MODEL_TYPES


@hookimpl
def qkcore_card_notes(plan: CapturePlan) -> list[str]:
    # Sliding layers and their windows are listed by the card itself (from the layer kinds).
    return [f"Qwen2: Q/K are the biased q_proj/k_proj outputs {rope_stage(plan.pre_rope)}."]
