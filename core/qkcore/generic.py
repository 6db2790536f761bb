"""Generic defaults for every model hook.

These answer for any model whose attention goes through transformers'
``AttentionInterface`` and carries ``layer_idx`` (llama-like families). A
family plugin overrides only what differs; all hooks here are ``trylast``.
"""

from __future__ import annotations

import itertools
import re
import sys
from typing import TYPE_CHECKING, Any, Callable

from qkcore import hookimpl
from qkcore.hookspecs import OnQK
from qkcore.layers import AttentionLayer, RopeSite, describe_layer, module_window, text_decoder

if TYPE_CHECKING:  # pragma: no cover - typing only (plugins load for `qkcore --help`: no torch import)
    from torch import nn
    from transformers import PretrainedConfig

_LAYER_KINDS = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "sliding"}


@hookimpl(trylast=True)
def qkcore_model_class(config: PretrainedConfig) -> type:
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
def qkcore_instrument(model: nn.Module, layers: list[AttentionLayer], on_qk: OnQK) -> "AttentionInterfaceHandle":
    return AttentionInterfaceHandle.install(model, on_qk)


class AttentionInterfaceHandle:
    """A capturing attention function registered with transformers, for one capture.

    It records the query/key the kernel receives, then calls the real kernel
    (``sdpa``, ``flash_attention_*``, or the family's own eager function).
    The matching mask function is registered too: without it transformers
    hands ``attention_mask=None`` to every layer and sliding-window layers
    would attend to the whole prefix.

    Each handle registers under its own name (``qkcore_<n>_<kernel>``) a function
    bound to its own ``on_qk``, so two captures in one process (a notebook, a test
    suite, a worker running two tasks) never see each other's rows; :meth:`remove`
    restores the model's attention implementation and both registries.
    """

    PREFIX = "qkcore_"
    _OURS = re.compile(r"^qkcore_(?:\d+_)?")  # a name one of our handles registered
    _serial = itertools.count()

    def __init__(self, model: nn.Module, previous: str, name: str, replaced: dict[str, Any]) -> None:
        self.model = model
        self.previous = previous
        self.name = name
        self._replaced = replaced  # registry -> what ``name`` held before (``_MISSING``: nothing)

    @classmethod
    def install(cls, model: nn.Module, on_qk: OnQK) -> "AttentionInterfaceHandle":
        """Register a capturing kernel bound to ``on_qk`` and switch ``model`` to it."""
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        previous = model.config._attn_implementation or "sdpa"
        base = cls._OURS.sub("", previous)
        name = f"{cls.PREFIX}{next(cls._serial)}_{base}"
        replaced = {}
        for interface, function in (
            (AttentionInterface, _capturing_attention(base, on_qk)),
            (AttentionMaskInterface, ALL_MASK_ATTENTION_FUNCTIONS[base]),
        ):
            replaced[interface] = interface._global_mapping.get(name, _MISSING)
            interface.register(name, function)
        handle = cls(model, previous, name, replaced)
        try:
            model.set_attn_implementation(name)
        except BaseException:
            handle._unregister()
            raise
        return handle

    def remove(self) -> None:
        """Restore the model's attention implementation and unregister this handle's functions."""
        try:
            self.model.set_attn_implementation(self.previous)
        finally:
            self._unregister()

    def _unregister(self) -> None:
        for interface, before in self._replaced.items():
            # The registries are class-level dicts that ``register`` writes into; transformers
            # has no unregister, so the entry is restored (or dropped) in the same dict.
            if before is _MISSING:
                interface._global_mapping.pop(self.name, None)
            else:
                interface._global_mapping[self.name] = before
        self._replaced = {}


_MISSING = object()


def _capturing_attention(base: str, on_qk: OnQK) -> Callable:
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
        on_qk(module, query, key)
        return kernel_for(module)(module, query, key, value, attention_mask, **kwargs)

    capturing_attention.__name__ = f"qkcore_capturing_{base}"
    return capturing_attention
