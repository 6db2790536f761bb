"""qkcore plugin for SmolLM3 models (``model_type: smollm3``, ``SmolLM3ForCausalLM``).

SmolLM3 skips rotary embedding on its NoPE layers: ``config.no_rope_layers[i]``
is 1 where layer ``i`` applies RoPE and 0 where it does not (by default every
4th layer: 3, 7, 11, ...). transformers copies that flag into
``SmolLM3Attention.use_rope`` at construction, which the forward pass reads and
the core's generic RoPE site follows. On NoPE layers the captured rows are the raw
``q_proj``/``k_proj`` outputs in both capture modes, so post-RoPE and pre-RoPE
rows coincide there. Sliding windows exist only with ``use_sliding_window``
(on NoPE layers); the released checkpoints use full attention everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkcore import hookimpl

if TYPE_CHECKING:  # pragma: no cover - typing only (keep imports light: plugins load for `qkcore --help`)
    from torch import nn

    from qkcore.capture import CapturePlan

MODEL_TYPES = ["smollm3"]


def nope_layers(config: object) -> list[int]:
    """Indices of the layers that apply no RoPE (``no_rope_layers[i] == 0``)."""
    flags = list(getattr(config, "no_rope_layers", None) or [])
    return [index for index, uses_rope in enumerate(flags) if not uses_rope]


@hookimpl
def qkcore_model_types() -> list[str]:
    return MODEL_TYPES


@hookimpl
def qkcore_card_notes(model: nn.Module, plan: CapturePlan) -> list[str]:
    nope = nope_layers(model.config.get_text_config())
    rows = (
        "; this pre-RoPE capture records the raw q_proj/k_proj outputs on every layer."
        if plan.pre_rope
        else ": rows are the raw q_proj/k_proj outputs in both capture modes (post-RoPE rows equal pre-RoPE "
        "rows). All other layers are captured after rotary embedding."
    )
    return [f"SmolLM3 NoPE layers (no_rope_layers == 0): {nope}. On these layers no rotary embedding is applied{rows}"]
