"""qkcore plugin for Llama 3.2 Vision (``model_type: mllama``).

The text decoder interleaves self-attention layers with cross-attention layers
(``text_config.cross_attention_layers``) that attend to image features. Only the
self-attention layers are captured: cross-attention layers are listed with kind
``"cross"`` (never captured) and keep their place in the numbering, so ``lXX`` is
the text decoder's own layer index. Self-attention is Llama's: projections,
RoPE on every layer, GQA, scale ``head_dim ** -0.5``; the core's generic RoPE site
applies (projections; no RoPE on cross-attention layers).

The model class is the generic ``AutoModelForCausalLM``, which resolves ``mllama``
to ``MllamaForCausalLM``: the text decoder and LM head only. The hub checkpoints
store ``language_model.model.*`` / ``language_model.lm_head`` next to
``vision_model.*``; ``MllamaForCausalLM``'s ``base_model_prefix``
(``"language_model"``) strips that prefix, so every text weight loads and the
vision weights (~0.9B parameters, never run here) are skipped instead of occupying
the accelerator (``tests/integration/families/test_mllama.py`` checks this on a checkpoint
written in the hub's layout).

The capture runs text only: ``MllamaTextModel`` skips cross-attention layers when
no image states are given, so they are never called.

Head sampling: by default the ``count`` heads are drawn from the self-attention
layers only. The original sniff-qk drew them from all decoder layers, cross-attention
included, and captured only the picks on self-attention layers (239 of 300 for
Llama-3.2-11B-Vision); ``capture.head_sampling.candidates: all_decoder_layers``
reproduces that (see :mod:`qkcore.heads`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkcore import hookimpl
from qkcore.layers import AttentionLayer, describe_layer, rope_stage, text_decoder

if TYPE_CHECKING:  # pragma: no cover - typing only (keep imports light: plugins load for `qkcore --help`)
    from torch import nn

    from qkcore.capture import CapturePlan

MODEL_TYPES = ["mllama"]


@hookimpl
def qkcore_model_types() -> list[str]:
    return MODEL_TYPES


@hookimpl
def qkcore_attention_layers(model: nn.Module) -> list[AttentionLayer]:
    # Cross-attention layers keep their decoder index (config names count them) but are never captured.
    decoder = text_decoder(model)
    config = decoder.config
    cross = set(config.cross_attention_layers or [])
    return [
        describe_layer(index, layer.cross_attn, config, kind="cross")
        if index in cross
        else describe_layer(index, layer.self_attn, config)
        for index, layer in enumerate(decoder.layers)
    ]


@hookimpl
def qkcore_card_notes(layers: list[AttentionLayer], plan: CapturePlan) -> list[str]:
    cross = [layer.index for layer in layers if layer.kind == "cross"]
    return [
        "Mllama (Llama 3.2 Vision): text-only forward of the text decoder; Q/K are the projected "
        f"self-attention query/key states {rope_stage(plan.pre_rope)}.",
        f"Cross-attention layers {cross} attend to image features and are never captured; layer numbers "
        "(lXX) are text decoder indices, counting the cross-attention layers.",
    ]
