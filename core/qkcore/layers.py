"""Descriptions of a model's attention layers, produced by family plugins."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:  # pragma: no cover - typing only (plugins load for `qkcore --help`: no torch import)
    from torch import nn

LayerKind = Literal["full", "sliding", "cross"]


@dataclass(frozen=True, eq=False)
class AttentionLayer:
    """One attention layer as the capture sees it.

    ``index`` is the decoder-layer index used in config names (``lXX``).
    """

    index: int
    module: nn.Module
    kind: LayerKind
    sliding_window: int | None
    num_query_heads: int
    num_key_value_heads: int
    head_dim: int

    @property
    def capturable(self) -> bool:
        """Cross-attention layers are never captured."""
        return self.kind != "cross"


@dataclass(frozen=True, eq=False)
class RopeSite:
    """Where a layer's pre-RoPE query and key can be observed.

    ``query_source``/``key_source`` output the pre-RoPE tensors, shaped
    ``(batch, seq, heads * head_dim)`` or ``(batch, seq, heads, head_dim)``, or
    ``(batch, heads, seq, head_dim)`` when ``heads_first`` (norms applied after
    the head transpose). ``applies_rope`` is false on NoPE layers, where post-
    and pre-RoPE coincide.
    """

    applies_rope: bool
    query_source: nn.Module
    key_source: nn.Module
    heads_first: bool = False


def text_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack that owns ``layers``: ``model.model``, or its ``language_model``
    in vision-language wrappers (``*ForConditionalGeneration``); a bare backbone is itself."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def module_window(attention: nn.Module) -> int | None:
    """The window an attention module passes to its kernel (``sliding_window``), if any."""
    return getattr(attention, "sliding_window", None)


def describe_layer(
    index: int, attention: nn.Module, config: Any, *, window: int | None = None, kind: LayerKind | None = None
) -> AttentionLayer:
    """One :class:`AttentionLayer`: ``"sliding"`` when it has a window, else ``"full"`` (unless ``kind``).

    Head counts come from the (text) config; configs without GQA have as many
    key/value heads as query heads.
    """
    num_query_heads = int(config.num_attention_heads)
    return AttentionLayer(
        index=index,
        module=attention,
        kind=kind or ("sliding" if window else "full"),
        sliding_window=int(window) if window else None,
        num_query_heads=num_query_heads,
        num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or num_query_heads),
        head_dim=int(getattr(attention, "head_dim", None) or config.hidden_size // num_query_heads),
    )


def self_attention_layers(
    model: nn.Module, window_of: Callable[[nn.Module], int | None] = module_window
) -> list[AttentionLayer]:
    """Describe ``layer.self_attn`` of every layer of ``model``'s text decoder, numbered in decoder order.

    The window is what ``window_of`` reads from the attention module: take it from
    what the module actually hands its kernel, not from a guess at the config.
    """
    decoder = text_decoder(model)
    return [
        describe_layer(index, layer.self_attn, decoder.config, window=window_of(layer.self_attn))
        for index, layer in enumerate(decoder.layers)
    ]


def rope_stage(pre_rope: bool) -> str:
    """The words a card note uses for the stage a run's rows are taken at.

    ``"before rotary embedding"`` for a pre-RoPE run (``plan.pre_rope``), else
    ``"after rotary embedding"``: a family note built on it is true for both stages.
    """
    return "before rotary embedding" if pre_rope else "after rotary embedding"


def rope_sources(layers: Iterable[AttentionLayer], rope_sites: Mapping[int, RopeSite]) -> str:
    """Where RoPE follows, in a card note's words: ``"q_norm/k_norm"``, ``"q_proj/k_proj"``.

    The attention modules' own names for the pre-RoPE sources the family declared
    (``qkcore_locate_rope``, as the run's ``plan.rope_sites`` holds them) on the layers
    that apply RoPE, so a note cannot say one thing while the capture hooks another.
    Layers that disagree are all named (``"a/b or c/d"``); none declared is an error.
    """
    words: list[str] = []
    for layer in layers:
        site = rope_sites.get(layer.index)
        if site is None or not site.applies_rope:
            continue
        names = {id(child): name for name, child in layer.module.named_modules() if name}
        pair = "/".join(
            names.get(id(source), type(source).__name__) for source in (site.query_source, site.key_source)
        )
        if pair not in words:
            words.append(pair)
    if not words:
        raise ValueError("no layer has a declared RoPE site (plan.rope_sites): nothing to say where RoPE applies")
    return " or ".join(words)
