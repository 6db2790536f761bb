"""qkcore plugin for Qwen3 models (``model_type: qwen3``, ``Qwen3ForCausalLM``).

Qwen3 attention RMS-normalises each query/key head (``q_norm``/``k_norm``)
*before* RoPE and hands the rotated tensors to the attention interface, so the
core's attention-interface capture sees post-norm, post-RoPE Q/K. The pre-RoPE
stage is therefore the output of the per-head norms, not of the projections.
Layers may be sliding-window (``layer_types`` with ``use_sliding_window``);
the released checkpoints use full attention everywhere. RoPE settings such as
YaRN come from ``rope_parameters`` (``model.config_overrides`` may set them).

The generic default (``qkcore.generic``) already takes the per-head norms as the
pre-RoPE site and each module's own window; this plugin writes the card notes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkcore import hookimpl
from qkcore.layers import AttentionLayer, rope_sources

if TYPE_CHECKING:  # pragma: no cover - typing only (keep imports light: plugins load for `qkcore --help`)
    from torch import nn

    from qkcore.capture import CapturePlan

MODEL_TYPES = ["qwen3"]


@hookimpl
def qkcore_model_types() -> list[str]:
    return MODEL_TYPES


@hookimpl
def qkcore_card_notes(model: nn.Module, layers: list[AttentionLayer], plan: CapturePlan) -> list[str]:
    # The norms' names come from the RoPE site the run declared, not from this text.
    norms = rope_sources(layers, plan.rope_sites)
    rows = (
        f"these pre-RoPE rows are the {norms} outputs."
        if plan.pre_rope
        else f"post-RoPE rows are post-norm. Pre-RoPE capture records the {norms} outputs."
    )
    notes = [f"Qwen3: Q/K are RMS-normalised per head ({norms}) before RoPE; {rows}"]
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", "default")
    if rotary is not None and rope_type != "default":
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        parameters = dict(getattr(model.config.get_text_config(), "rope_parameters", None) or {})
        # YaRN multiplies cos/sin by attention_scaling, so both rotated Q and K carry it.
        carried = (
            "a factor of the rotation, so these pre-RoPE rows do not include it."
            if plan.pre_rope
            else "so post-RoPE Q and K rows each include that factor."
        )
        notes.append(
            f"RoPE type '{rope_type}' ({parameters}); cos/sin are scaled by attention_scaling={scaling:.6g}, {carried}"
        )
    return notes
