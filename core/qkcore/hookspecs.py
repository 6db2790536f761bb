"""The hooks a qkcore plugin may implement.

A model-family plugin is a module (registered under the ``qkcore.plugins``
entry-point group) that implements some of the hooks below with
``@qkcore.hookimpl``. The core picks the one plugin whose
:func:`qkcore_model_types` lists the model's ``config.model_type`` and calls the
model hooks on that plugin only; whatever it leaves unimplemented falls back to
the core's generic implementation (``qkcore.generic``). Sampler and analysis
hooks are collected from every plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn

    from qkcore.capture import CapturePlan
    from qkcore.layers import AttentionLayer, RopeSite
    from qkcore.samplers import SamplerFactory

hookspec = pluggy.HookspecMarker("qkcore")


@hookspec
def qkcore_model_types() -> list[str]:
    """Return the ``config.model_type`` values this plugin handles (e.g. ``["llama"]``)."""


@hookspec(firstresult=True)
def qkcore_model_class(config: Any) -> type | None:
    """Return the transformers class to load for this architecture config.

    Generic default: ``AutoModelForCausalLM``'s choice. A family whose checkpoints
    are not causal LMs (e.g. a vision-language model) names its own class here:
    an Auto class or a concrete ``PreTrainedModel`` subclass.
    """


@hookspec(firstresult=True)
def qkcore_backbone(model: nn.Module) -> nn.Module | None:
    """Return the module to run for the capture forward pass (no LM head).

    It is called as ``backbone(input_ids=..., use_cache=False)``. Generic default:
    the text decoder, ``model.model`` or its ``language_model`` in vision-language
    wrappers (:func:`qkcore.layers.text_decoder`).
    """


@hookspec(firstresult=True)
def qkcore_attention_layers(model: nn.Module) -> list[AttentionLayer] | None:
    """Describe every attention layer of ``model``, in decoder order.

    Each :class:`~qkcore.layers.AttentionLayer` carries the decoder index used in
    config names (``lXX``), the attention module, whether it is full, sliding or
    cross attention, its ``sliding_window``, and its head counts. Cross-attention
    layers are listed but never captured. Generic default: every module with a
    ``layer_idx`` and ``q_proj``/``k_proj``, with the window it hands its kernel (its
    own ``sliding_window``, else the config's model-wide one; none on layers that
    ``config.layer_types`` marks full). Implement it only where that is wrong for the
    family (e.g. cross-attention layers), with :func:`qkcore.layers.describe_layer` or
    :func:`qkcore.layers.self_attention_layers`.
    """


@hookspec(firstresult=True)
def qkcore_locate_rope(model: nn.Module, layer: AttentionLayer) -> RopeSite | None:
    """Say whether RoPE is applied in ``layer`` and where its pre-RoPE Q and K come from.

    The returned :class:`~qkcore.layers.RopeSite` names the modules whose outputs
    are the query and key right before rotary embedding (the projections, or the
    per-head norm where the family has one). Pre-RoPE capture hooks those modules.
    Generic default: ``q_norm``/``k_norm`` if present, else ``q_proj``/``k_proj``,
    with their outputs laid out ``(batch, seq, ...)``; RoPE applies unless the module's
    ``use_rope`` is false or the layer is cross-attention. Implement it where the
    family differs (e.g. norms applied after the head transpose: ``heads_first``).
    """


@hookspec(firstresult=True)
def qkcore_key_head(query_head: int, num_query_heads: int, num_key_value_heads: int) -> int | None:
    """Map a query head to the key/value head it attends with (GQA).

    Generic default: ``query_head // (num_query_heads // num_key_value_heads)``.
    """


@hookspec(firstresult=True)
def qkcore_instrument(model: nn.Module, layers: list[AttentionLayer], on_qk: Any) -> Any:
    """Route every attention call of ``model`` through ``on_qk(module, query, key)``.

    ``on_qk`` receives the tensors the attention kernel receives: post-RoPE,
    shaped ``(batch, heads, seq, head_dim)``, before ``repeat_kv``. Return an
    object with a ``remove()`` method that restores the model. Generic default:
    a capturing function registered with transformers' ``AttentionInterface``
    (and the matching ``AttentionMaskInterface`` entry).
    """


@hookspec(firstresult=True)
def qkcore_postprocess_query(layer: AttentionLayer, query: Any, positions: Any) -> Any:
    """Undo what the family does to the query after RoPE, so the row is exactly post-RoPE.

    Called only when ``capture.unscaled_queries`` is true (and never on pre-RoPE
    rows): by default query rows are the tensor the attention kernel receives,
    which is what the original tool recorded. ``query`` holds the kept rows,
    ``(heads, n, head_dim)``, ``positions`` their positions, ``(n,)``. A family
    that scales the query after RoPE (e.g. Ministral 3's position scale) divides
    it out here; ``None`` means the tensor is used as is.
    """


@hookspec
def qkcore_card_notes(model: nn.Module, layers: list[AttentionLayer], plan: CapturePlan) -> list[str]:
    """Return lines for the dataset card about how this family was captured.

    ``plan`` is the run's :class:`~qkcore.capture.CapturePlan` (RoPE stage,
    ``unscaled_queries``, heads), so a note can say which form the rows are in. Each
    note must be true of *this* run's rows: with ``plan.pre_rope`` they are taken
    before rotary embedding (:func:`qkcore.layers.rope_stage` words the stage), and no
    note may claim otherwise (:func:`qkcore.testing.post_rope_claims` checks that).
    Like every hook, an implementation may take only the arguments it uses.
    """


@hookspec
def qkcore_samplers() -> dict[str, SamplerFactory]:
    """Return position samplers by ``capture.sampler.type`` name.

    A factory is called as ``factory(base_rate=..., min_bucket_size=...)`` and
    returns a :class:`~qkcore.samplers.Sampler`.
    """


@hookspec
def qkcore_analyses() -> dict[str, Any]:
    """Return analyses by name (``qkcore <name> ...``); each value is an :class:`~qkcore.analysis.Analysis`."""
