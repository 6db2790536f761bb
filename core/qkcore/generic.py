"""Generic defaults for every model hook.

These answer for any model whose attention goes through transformers'
``AttentionInterface`` and carries ``layer_idx`` (llama-like families). A
family plugin overrides only what differs; all hooks here are ``trylast``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable

from qkcore import hookimpl
from qkcore.layers import AttentionLayer, RopeSite, describe_layer, module_window, text_decoder

if TYPE_CHECKING:  # pragma: no cover - typing only (plugins load for `qkcore --help`: no torch import)
    from torch import nn

_LAYER_KINDS = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "sliding"}


@hookimpl(trylast=True)
def qkcore_model_class(config: Any) -> type:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


@hookimpl(trylast=True)
def qkcore_backbone(model: nn.Module) -> nn.Module:
    # The text decoder stack: a text-only forward never runs a vision tower.
    return text_decoder(model)


@hookimpl(trylast=True)
def qkcore_attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """Every module with ``layer_idx`` and ``q_proj``/``k_proj``, by index, with the window its kernel gets.

    The window is the module's own ``sliding_window`` (what it passes to its kernel),
    else the config's model-wide one (Mistral keeps no per-module window).
    """
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None)
    layers = []
    for module in model.modules():
        if not (hasattr(module, "layer_idx") and hasattr(module, "q_proj") and hasattr(module, "k_proj")):
            continue
        index = int(module.layer_idx)
        window = module_window(module) or getattr(config, "sliding_window", None)
        if layer_types is not None and index < len(layer_types):
            # A layer typed full never slides; one typed sliding slides only if a window is set
            # (configs may keep layer_types while use_sliding_window is off). Older configs
            # (e.g. mistral) have no layer_types and one model-wide window.
            window = window if _LAYER_KINDS.get(layer_types[index], "full") == "sliding" else None
        layers.append(describe_layer(index, module, config, window=window))
    return sorted(layers, key=lambda layer: layer.index)


@hookimpl(trylast=True)
def qkcore_locate_rope(model: nn.Module, layer: AttentionLayer) -> RopeSite:
    """RoPE right after the per-head norms (``q_norm``/``k_norm``) if the module has them, else the projections.

    Every layer rotates except NoPE layers (the module's ``use_rope`` is false) and
    cross-attention layers (their keys are image features, which have no positions).
    """
    module = layer.module
    # Per-head norms (q_norm/k_norm) run before RoPE: their output is the pre-RoPE tensor.
    query_source = getattr(module, "q_norm", None) or module.q_proj
    key_source = getattr(module, "k_norm", None) or module.k_proj
    applies_rope = layer.capturable and bool(getattr(module, "use_rope", True))
    return RopeSite(applies_rope=applies_rope, query_source=query_source, key_source=key_source)


@hookimpl(trylast=True)
def qkcore_key_head(query_head: int, num_query_heads: int, num_key_value_heads: int) -> int:
    from qkcore.heads import key_head_for

    return key_head_for(query_head, num_query_heads, num_key_value_heads)


@hookimpl(trylast=True)
def qkcore_instrument(model: nn.Module, layers: list[AttentionLayer], on_qk: Callable) -> "AttentionInterfaceHandle":
    return AttentionInterfaceHandle.install(model, on_qk)


class AttentionInterfaceHandle:
    """A capturing attention function registered with transformers.

    It records the query/key the kernel receives, then calls the real kernel
    (``sdpa``, ``flash_attention_*``, or the family's own eager function).
    The matching mask function is registered too: without it transformers
    hands ``attention_mask=None`` to every layer and sliding-window layers
    would attend to the whole prefix.
    """

    PREFIX = "qkcore_"
    _active: Callable | None = None  # one capture per process at a time

    def __init__(self, model: nn.Module, previous: str) -> None:
        self.model = model
        self.previous = previous

    @classmethod
    def install(cls, model: nn.Module, on_qk: Callable) -> "AttentionInterfaceHandle":
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        previous = model.config._attn_implementation or "sdpa"
        base = previous.removeprefix(cls.PREFIX)
        name = cls.PREFIX + base
        AttentionInterface.register(name, _capturing_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
        model.set_attn_implementation(name)
        cls._active = on_qk
        return cls(model, base)

    def remove(self) -> None:
        type(self)._active = None
        self.model.set_attn_implementation(self.previous)


def _capturing_attention(base: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager_by_class: dict[type, Callable] = {}

    def kernel_for(module: nn.Module) -> Callable:
        if base != "eager":
            return ALL_ATTENTION_FUNCTIONS[base]
        cls = type(module)
        if cls not in eager_by_class:  # the family's own eager (softcapping, sinks...)
            eager_by_class[cls] = getattr(sys.modules[cls.__module__], "eager_attention_forward")
        return eager_by_class[cls]

    def capturing_attention(module: nn.Module, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any):
        on_qk = AttentionInterfaceHandle._active
        if on_qk is not None:
            on_qk(module, query, key)
        return kernel_for(module)(module, query, key, value, attention_mask, **kwargs)

    capturing_attention.__name__ = f"qkcore_capturing_{base}"
    return capturing_attention
