"""qkcore plugin for GLM and GLM-4 models (``model_type: glm`` / ``glm4``).

Both use *partial* rotary embedding: only the first ``rotary_dim`` dimensions
of each head (``head_dim * partial_rotary_factor``, 0.5 by default) are rotated,
in interleaved pairs (dims 0/1, 2/3, ...); the remaining dimensions pass through
unchanged. Post-RoPE rows therefore differ from pre-RoPE rows only in the
rotary dimensions. Q/K come from biased ``q_proj``/``k_proj`` and reach the
attention interface after RoPE; every layer is full attention. Layers, RoPE site
(the projections: the unrotated dims are part of the same tensor) and capture are
the core's generic default; this plugin writes the card note.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkcore import hookimpl
from qkcore.layers import AttentionLayer, rope_sources

if TYPE_CHECKING:  # pragma: no cover - typing only (keep imports light: plugins load for `qkcore --help`)
    from torch import nn

    from qkcore.capture import CapturePlan

MODEL_TYPES = ["glm", "glm4"]


def rotary_dim(model: nn.Module) -> int:
    """How many leading dims of each head are rotated, read from the model's own rotary embedding."""
    rotary = getattr(model, "model", model).rotary_emb
    # One inverse frequency per rotated pair.
    return 2 * int(rotary.inv_freq.numel())


@hookimpl
def qkcore_model_types() -> list[str]:
    return MODEL_TYPES


@hookimpl
def qkcore_card_notes(model: nn.Module, layers: list[AttentionLayer], plan: CapturePlan) -> list[str]:
    head_dim = layers[0].head_dim if layers else 0
    dims = rotary_dim(model)
    sources = rope_sources(layers, plan.rope_sites)  # the generic RoPE site: the projections
    if plan.pre_rope:
        rows = (
            f"GLM partial rotary: RoPE rotates only the first {dims} of {head_dim} dims of each Q/K head "
            f"(interleaved pairs); these pre-RoPE rows are the {sources} outputs, unrotated in every dim "
            f"(dims {dims}-{head_dim - 1} are never rotated)."
        )
    else:
        rows = (
            f"GLM partial rotary: only the first {dims} of {head_dim} dims of each Q/K head are rotated "
            f"(interleaved pairs); dims {dims}-{head_dim - 1} are the unrotated {sources} outputs "
            "(identical in pre- and post-RoPE captures)."
        )
    return [f"{rows} All layers are full attention."]
