"""qkcore plugin for Mistral-family text decoders.

Model types: ``mistral``, ``ministral``, ``ministral3`` and ``mistral3`` (the
vision-language wrapper the Ministral 3 hub checkpoints are published as; only
its text decoder is run and captured).

What differs from Llama:

* **Sliding windows.** ``mistral`` and ``ministral3`` apply one model-wide
  ``config.sliding_window`` (``None`` in the Ministral 3 checkpoints) to every
  layer; ``ministral`` sets a window per layer from ``config.layer_types``.
  The core's generic layer list reads each module's own window, else the
  model-wide one, so sliding layers are listed with kind ``"sliding"`` and their
  window: the ``sliding_window`` column holds it and ``full_attention_only`` skips
  them. RoPE follows the projections (the generic RoPE site).
* **Llama-4 query scaling (Ministral 3).** After RoPE, ``Ministral3Attention``
  multiplies the query by ``1 + beta * log(1 + floor(position / original_max))``
  (``llama_4_scaling_beta`` and ``original_max_position_embeddings`` in
  ``rope_parameters``). By default the query rows are that scaled tensor, the one
  the attention kernel receives and the one the original tool published; with
  ``capture.unscaled_queries: true`` :func:`qkcore_postprocess_query` divides the
  scale back out per position, so the rows are exactly post-RoPE. The card says
  which form a dataset holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qkcore import hookimpl
from qkcore.layers import AttentionLayer, rope_stage

if TYPE_CHECKING:  # pragma: no cover - typing only (keep imports light: plugins load for `qkcore --help`)
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from qkcore.capture import CapturePlan

MODEL_TYPES = ["mistral", "ministral", "ministral3", "mistral3"]

#: Text model types whose attention scales the query after RoPE (Llama-4 style).
_SCALED_QUERY_TYPES = {"ministral3"}


@hookimpl
def qkcore_model_types() -> list[str]:
    return MODEL_TYPES


@hookimpl
def qkcore_model_class(config: PretrainedConfig) -> type | None:
    # The Ministral 3 hub checkpoints are `mistral3` (vision + text), which AutoModelForCausalLM
    # does not know; the image-text-to-text auto class resolves it to Mistral3ForConditionalGeneration,
    # whose layout the checkpoint's weight names map to. (An auto class, not the concrete one: the
    # core builds random models with `from_config`, which only auto classes have.)
    if config.model_type == "mistral3":
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    return None  # text-only types: the generic AutoModelForCausalLM


def query_scale_parameters(module: nn.Module) -> tuple[float, int] | None:
    """``(beta, original_max_position_embeddings)`` if ``module`` scales its query after RoPE, else ``None``."""
    config = getattr(module, "config", None)
    if config is None or getattr(config, "model_type", None) not in _SCALED_QUERY_TYPES:
        return None
    rope = config.rope_parameters
    return float(rope["llama_4_scaling_beta"]), int(rope["original_max_position_embeddings"])


def query_scale(positions: torch.Tensor, beta: float, original_max: int) -> torch.Tensor:
    """The per-position factor Ministral 3 multiplies the post-RoPE query by, shape ``(n,)`` float32.

    Uses transformers' own ``get_llama_4_attn_scale`` so the value is the model's to the bit.
    """
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    return get_llama_4_attn_scale(positions.reshape(1, -1), beta, original_max).reshape(-1)


@hookimpl
def qkcore_postprocess_query(
    layer: AttentionLayer, query: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor | None:
    import torch

    parameters = query_scale_parameters(layer.module)
    if parameters is None:
        return None
    # The model casts the scale to the query dtype before multiplying; divide by that same
    # value (in float32) so the row is the rotated query before scaling.
    scale = query_scale(positions, *parameters).to(query.dtype).to(torch.float32)
    return query.to(torch.float32) / scale[None, :, None]


@hookimpl
def qkcore_card_notes(layers: list[AttentionLayer], plan: CapturePlan) -> list[str]:
    notes = [f"Mistral family: Q/K are the projected query/key states right {rope_stage(plan.pre_rope)}."]
    sliding = [layer for layer in layers if layer.kind == "sliding"]
    if sliding:
        windows = sorted({layer.sliding_window for layer in sliding})
        notes.append(
            f"{len(sliding)} of {len(layers)} layers use sliding-window attention (window "
            f"{', '.join(map(str, windows))} tokens, in the sliding_window column); full_attention_only skips them."
        )
    parameters = query_scale_parameters(layers[0].module) if layers else None
    if parameters is not None:
        beta, original = parameters
        scale = (
            f"Ministral 3 multiplies the {'rotated query' if plan.pre_rope else 'query after RoPE'} by "
            "1 + beta * ln(1 + floor(position / "
            f"original_max_position_embeddings)) (beta = {beta:g}, original_max_position_embeddings = {original}; "
            f"the scale is 1 below position {original}). Keys are not scaled."
        )
        if plan.pre_rope:
            form = "Query rows are pre-RoPE, so they carry no scale."
        elif plan.unscaled_queries:
            form = (
                "Query rows are unscaled (capture.unscaled_queries: true): the scale is divided back out per "
                "position, so they are exactly post-RoPE; multiply a row by the scale of its position to get the "
                "tensor the attention kernel receives (and the original sniff-qk's rows)."
            )
        else:
            form = (
                "Query rows include the scale (capture.unscaled_queries: false, the default): they are the tensor "
                "the attention kernel receives, as in the original sniff-qk's datasets; divide a row by the scale "
                "of its position for the plain post-RoPE query."
            )
        notes.append(f"{scale} {form}")
    return notes
