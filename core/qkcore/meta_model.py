"""A model built on the ``meta`` device: every module and shape, no weights and no compute.

Enough to ask a family's structural hooks (layers, RoPE sites, card notes) about a model
of any size in milliseconds; ``qkcore plan`` and the plugin test kit both build it here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qkcore.errors import QkcoreError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from torch import nn
    from transformers import PretrainedConfig

    from qkcore.plugins import Family


def on_meta_device(
    config: PretrainedConfig,
    family: Family,
    *,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """``config`` built by ``family``'s model class (``qkcore_model_class``) on the meta device, in eval mode.

    An attention implementation that cannot be set up here (e.g. flash attention on a
    machine without it) falls back to ``eager``: it changes no layer or head. A model
    that cannot be built at all is a :class:`QkcoreError` naming the model type and class.
    """
    import torch

    model_class = family.hooks.qkcore_model_class(config=config)
    extra: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code else {}
    attn = attn_implementation or "sdpa"
    error: Exception | None = None
    for candidate in dict.fromkeys((attn, "eager")):
        try:
            with torch.device("meta"):
                model = model_class.from_config(config, attn_implementation=candidate, **extra)
            return model.eval()
        except (ImportError, ValueError) as exc:
            error = exc
    raise QkcoreError(
        f"model.config: cannot build '{config.model_type}' with {getattr(model_class, '__name__', model_class)} "
        f"on the meta device: {error}"
    )
