"""Descriptions of a model's attention layers, produced by family plugins."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
