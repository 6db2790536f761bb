"""The hooks a qkcore plugin may implement.

A plugin is a module registered under the ``qkcore.plugins`` entry-point group
that implements some of the hooks below with ``@qkcore.hookimpl``; an
implementation may take only the parameters it uses. Keep the module cheap to
import (import torch and transformers inside the hooks): every ``qkcore``
command, ``qkcore --help`` included, loads every plugin.

* **Model hooks** (``qkcore_model_class`` to ``qkcore_card_notes``): the core picks
  the one plugin whose :func:`qkcore_model_types` lists the model's
  ``config.model_type`` and calls these on that plugin only (no other plugin's
  implementation runs for that model, not even one from a plugin that declares no
  model types); whatever it leaves unimplemented falls back to the core's generic
  implementation (``qkcore.generic``).
* **Collected hooks** (``qkcore_model_types``, ``qkcore_samplers``,
  ``qkcore_register_commands``): called on every plugin. A name two plugins provide
  (a model type, a sampler, a command) is an error naming both; qkcore never picks one.

``firstresult`` hooks stop at the first implementation that returns something
other than ``None`` (the family's plugin before the generic one); the others
return a list with every implementation's result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import click
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from qkcore.capture import CapturePlan
    from qkcore.layers import AttentionLayer, RopeSite
    from qkcore.samplers import SamplerFactory

hookspec = pluggy.HookspecMarker("qkcore")

#: The capture callback ``qkcore_instrument`` routes attention calls to: ``on_qk(module, query, key)``.
OnQK = Callable[["nn.Module", "torch.Tensor", "torch.Tensor"], None]


class Instrumentation(Protocol):
    """What ``qkcore_instrument`` returns: ``remove()`` restores the model (and anything registered)."""

    def remove(self) -> None:
        """Undo the instrumentation."""


@hookspec
def qkcore_model_types() -> list[str]:
    """Return the ``config.model_type`` values this plugin handles (e.g. ``["llama"]``).

    Called on each plugin by itself (through pluggy, so ``QKCORE_TRACE_PLUGINS``
    shows each call) to find the one that handles a model; two plugins claiming the
    same type is an error naming both. Not ``firstresult``.
    """


@hookspec(firstresult=True)
def qkcore_model_class(config: PretrainedConfig) -> type | None:
    """Return the transformers class to load for this architecture config.

    :param config: the model's ``transformers.PretrainedConfig``.

    Generic default: ``AutoModelForCausalLM``'s choice. A family whose checkpoints
    are not causal LMs (e.g. a vision-language model) names its own class here:
    an Auto class or a concrete ``PreTrainedModel`` subclass. ``firstresult``.
    """


@hookspec(firstresult=True)
def qkcore_backbone(model: nn.Module) -> nn.Module | None:
    """Return the module to run for the capture forward pass (no LM head).

    :param model: the loaded model.

    It is called as ``backbone(input_ids=..., use_cache=False)``. Generic default:
    the text decoder, ``model.model`` or its ``language_model`` in vision-language
    wrappers (:func:`qkcore.layers.text_decoder`). ``firstresult``.
    """


@hookspec(firstresult=True)
def qkcore_attention_layers(model: nn.Module) -> list[AttentionLayer] | None:
    """Describe every attention layer of ``model``, in decoder order.

    :param model: the loaded model.

    Each :class:`~qkcore.layers.AttentionLayer` carries the decoder index used in
    config names (``lXX``), the attention module, whether it is full, sliding or
    cross attention, its ``sliding_window``, and its head counts. Cross-attention
    layers are listed but never captured. Generic default: every module with a
    ``layer_idx`` and ``q_proj``/``k_proj``, with the window it hands its kernel (its
    own ``sliding_window``, else the config's model-wide one; none on layers that
    ``config.layer_types`` marks full). Implement it only where that is wrong for the
    family (e.g. cross-attention layers), with :func:`qkcore.layers.describe_layer` or
    :func:`qkcore.layers.self_attention_layers`. ``firstresult``.
    """


@hookspec(firstresult=True)
def qkcore_locate_rope(model: nn.Module, layer: AttentionLayer) -> RopeSite | None:
    """Say whether RoPE is applied in ``layer`` and where its pre-RoPE Q and K come from.

    :param model: the loaded model.
    :param layer: one of the layers :func:`qkcore_attention_layers` described.

    The returned :class:`~qkcore.layers.RopeSite` names the modules whose outputs
    are the query and key right before rotary embedding (the projections, or the
    per-head norm where the family has one). Pre-RoPE capture hooks those modules.
    Generic default: ``q_norm``/``k_norm`` if present, else ``q_proj``/``k_proj``,
    with their outputs laid out ``(batch, seq, ...)``; RoPE applies unless the module's
    ``use_rope`` is false or the layer is cross-attention. Implement it where the
    family differs (e.g. norms applied after the head transpose: ``heads_first``).
    ``firstresult``.
    """


@hookspec(firstresult=True)
def qkcore_key_head(query_head: int, num_query_heads: int, num_key_value_heads: int) -> int | None:
    """Map a query head to the key/value head it attends with (GQA).

    :param query_head: the query head's index in its layer.
    :param num_query_heads: query heads per layer.
    :param num_key_value_heads: key/value heads per layer.

    Generic default: ``query_head // (num_query_heads // num_key_value_heads)``.
    ``firstresult``.
    """


@hookspec(firstresult=True)
def qkcore_instrument(model: nn.Module, layers: list[AttentionLayer], on_qk: OnQK) -> Instrumentation | None:
    """Route every attention call of ``model`` through ``on_qk(module, query, key)``.

    :param model: the loaded model.
    :param layers: the layers to capture.
    :param on_qk: the capture callback (:data:`OnQK`).

    ``on_qk`` receives the tensors the attention kernel receives: post-RoPE,
    shaped ``(batch, heads, seq, head_dim)``, before ``repeat_kv``. Return an
    object with a ``remove()`` method (:class:`Instrumentation`) that restores the
    model and whatever it registered. Generic default: a capturing function
    registered with transformers' ``AttentionInterface`` (and the matching
    ``AttentionMaskInterface`` entry), both restored by ``remove()``. ``firstresult``.
    """


@hookspec(firstresult=True)
def qkcore_postprocess_query(layer: AttentionLayer, query: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """Undo what the family does to the query after RoPE, so the row is exactly post-RoPE.

    :param layer: the layer the rows come from.
    :param query: the kept rows, ``(heads, n, head_dim)``.
    :param positions: their positions, ``(n,)``.

    Called only when ``capture.unscaled_queries`` is true (and never on pre-RoPE
    rows): by default query rows are the tensor the attention kernel receives,
    which is what the original tool recorded. A family that scales the query after
    RoPE (e.g. Ministral 3's position scale) divides it out here; ``None`` means the
    tensor is used as is. ``firstresult``.
    """


@hookspec
def qkcore_card_notes(model: nn.Module, layers: list[AttentionLayer], plan: CapturePlan) -> list[str]:
    """Return lines for the dataset card about how this family was captured.

    :param model: the loaded model.
    :param layers: every attention layer of the model.
    :param plan: the run's :class:`~qkcore.capture.CapturePlan` (RoPE stage,
        ``unscaled_queries``, heads).

    Each note must be true of *this* run's rows: with ``plan.pre_rope`` they are
    taken before rotary embedding (:func:`qkcore.layers.rope_stage` words the stage),
    and no note may claim otherwise (:func:`qkcore.testing.post_rope_claims` checks
    that). Not ``firstresult``: the lines of every implementation are joined.
    """


@hookspec
def qkcore_samplers() -> dict[str, SamplerFactory]:
    """Return position samplers by ``capture.sampler.type`` name.

    A factory is called as ``factory(base_rate=..., min_bucket_size=...)`` and
    returns a :class:`~qkcore.samplers.Sampler`. Not ``firstresult``: every
    plugin's samplers are merged; a name two plugins provide is an error naming both.
    """


@hookspec
def qkcore_register_commands(cli: click.Group) -> None:
    """Add commands to the ``qkcore`` command line.

    :param cli: the root ``click.Group``; add to it with ``@cli.command()`` or
        ``cli.add_command(...)``.

    The built-in commands (``sniff``, ``push``, ``plan``, ``inspect``,
    ``plasticity``, ``plugins``) are added the same way, first; a command name that
    is already taken is an error naming both. A command's context object
    (``@click.pass_obj``) is the plugin manager with every loaded plugin. Import
    heavy libraries inside the command, not at module level, so ``qkcore --help``
    stays fast. Raise :class:`qkcore.errors.QkcoreError` for a user error: the CLI
    prints it as one ``qkcore: error:`` line and exits 2. Not ``firstresult``.
    """
