"""qkcore plugin for Gemma 3 (``gemma3_text``: 1B / 270M; ``gemma3``: the 4B-27B vision-language checkpoints).

This package is the worked example of a plugin living outside the core (see
README.md): nothing in qkcore knows Gemma; installing this package is the only
step that adds it.

What differs from Llama:

* **Mixed sliding / full layers** from ``config.layer_types`` (5 sliding : 1 full
  in the checkpoints); a sliding layer's window is ``config.sliding_window``.
  ``Gemma3Attention`` sets ``sliding_window`` only on sliding layers, so the core's
  generic layer list (each module's own window) describes them as they are.
* **Per-head RMS norms** ``q_norm``/``k_norm`` run before RoPE, so the pre-RoPE
  tensors are the norms' outputs (and post-RoPE rows are normalised, then rotated).
  Sliding and full layers use different RoPE bases (10k / 1M).
* **Scale** ``query_pre_attn_scalar ** -0.5`` (not ``head_dim ** -0.5``); it is
  applied to the logits by the kernel, so the recorded query is unscaled.
* **Soft-capping.** ``attn_logit_softcapping`` (``null`` in every Gemma 3 checkpoint)
  would act on logits, never on Q/K, so the rows do not depend on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkcore import hookimpl
from qkcore.layers import AttentionLayer, RopeSite, rope_sources, text_decoder

if TYPE_CHECKING:  # pragma: no cover - typing only (keep imports light: plugins load for `qkcore --help`)
    from torch import nn

    from qkcore.capture import CapturePlan

MODEL_TYPES = ["gemma3", "gemma3_text"]

# qkcore_model_class is not implemented: the generic AutoModelForCausalLM already maps
# gemma3_text -> Gemma3ForCausalLM and gemma3 -> Gemma3ForConditionalGeneration, the class
# whose layout the vision-language checkpoints' weight names map to.


@hookimpl
def qkcore_model_types() -> list[str]:
    return MODEL_TYPES


@hookimpl
def qkcore_locate_rope(model: nn.Module, layer: AttentionLayer) -> RopeSite:
    # RoPE follows the per-head norms on every layer: their outputs are the pre-RoPE Q/K.
    # Gemma 3 applies the norms after moving heads before the sequence axis.
    module = layer.module
    return RopeSite(applies_rope=True, query_source=module.q_norm, key_source=module.k_norm, heads_first=True)


@hookimpl
def qkcore_card_notes(model: nn.Module, layers: list[AttentionLayer], plan: CapturePlan) -> list[str]:
    config = text_decoder(model).config
    sliding = [layer.index for layer in layers if layer.kind == "sliding"]
    stage = (
        "before rotary embedding (the norms' outputs)."
        if plan.pre_rope
        else "after rotary embedding; pre-RoPE rows are the norms' outputs."
    )
    norms = rope_sources(layers, plan.rope_sites)  # the sources qkcore_locate_rope above declares
    notes = [
        f"Gemma 3: Q/K are the per-head RMS-normalised ({norms}) query/key states {stage}",
        f"Attention logits are q·k * query_pre_attn_scalar^-0.5 (query_pre_attn_scalar = "
        f"{config.query_pre_attn_scalar}), not head_dim^-0.5; the rows are unscaled.",
    ]
    if sliding:
        notes.append(
            f"{len(sliding)} of {len(layers)} layers use sliding-window attention (window {config.sliding_window} "
            "tokens, in the sliding_window column; RoPE base differs from full layers); full_attention_only skips them."
        )
    if config.attn_logit_softcapping:
        notes.append(
            f"attn_logit_softcapping = {config.attn_logit_softcapping} is set; soft-capping acts on the logits, "
            "not on Q/K, so the rows are unaffected (transformers 5.23's Gemma3Attention does not pass it to the "
            "attention kernel, so the model's own logits are not capped there)."
        )
    return notes
