"""Which query heads to capture, and which key heads they attend with.

The selection rule (candidate order and the ``random.Random(seed).sample`` call)
reproduces the original capture tool exactly, so the same config picks the same
heads as the published datasets.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol


class LayerLike(Protocol):
    """The attributes of :class:`qkcore.layers.AttentionLayer` that head selection reads."""

    @property
    def index(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def num_query_heads(self) -> int: ...


#: Maps ``(query_head, num_query_heads, num_key_value_heads)`` to a key head.
KeyHeadMapper = Callable[[int, int, int], int]


def key_head_for(query_head: int, num_query_heads: int, num_key_value_heads: int) -> int:
    """Return the key/value head that ``query_head`` attends with under GQA.

    Consecutive groups of ``num_query_heads // num_key_value_heads`` query heads
    share one key head (the layout ``repeat_kv`` produces).
    """
    if num_query_heads < 1 or num_key_value_heads < 1:
        raise ValueError(
            f"head counts must be >= 1, got num_query_heads={num_query_heads}, "
            f"num_key_value_heads={num_key_value_heads}"
        )
    if num_query_heads % num_key_value_heads != 0:
        raise ValueError(
            f"num_query_heads={num_query_heads} is not a multiple of num_key_value_heads={num_key_value_heads}"
        )
    if not 0 <= query_head < num_query_heads:
        raise ValueError(f"query_head={query_head} is outside 0..{num_query_heads - 1}")
    return query_head // (num_query_heads // num_key_value_heads)


def select_query_heads(
    layers: Sequence[LayerLike],
    *,
    layer_filter: Sequence[int] | None,
    head_filter: Sequence[int] | None,
    full_attention_only: bool,
    count: int | None,
    seed: int = 0,
) -> dict[int, list[int]]:
    """Pick the ``(layer, query head)`` pairs to capture.

    Candidates are listed layer-major (layers in the given order, heads
    ascending) from capturable layers that pass the filters; when there are more
    than ``count`` of them, ``random.Random(seed).sample(candidates, count)``
    picks the subset. Returns ``{layer_index: sorted heads}`` with ascending keys,
    omitting layers left without heads.
    """
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0 or None, got {count}")
    layer_set = None if layer_filter is None else set(layer_filter)
    head_set = None if head_filter is None else set(head_filter)
    candidates: list[tuple[int, int]] = []
    for layer in layers:
        if layer.kind == "cross":  # cross-attention is never captured
            continue
        if full_attention_only and layer.kind != "full":
            continue
        if layer_set is not None and layer.index not in layer_set:
            continue
        for head in range(layer.num_query_heads):
            if head_set is None or head in head_set:
                candidates.append((layer.index, head))
    # The candidate order above is part of the contract: sample() depends on it.
    chosen = candidates
    if count is not None and len(candidates) > count:
        chosen = random.Random(seed).sample(candidates, count)
    selected: dict[int, set[int]] = {}
    for layer_index, head in chosen:
        selected.setdefault(layer_index, set()).add(head)
    return {layer_index: sorted(selected[layer_index]) for layer_index in sorted(selected)}


def key_heads_for(
    query_heads: Iterable[int],
    num_query_heads: int,
    num_key_value_heads: int,
    mapper: KeyHeadMapper = key_head_for,
) -> list[int]:
    """Return the sorted distinct key heads used by ``query_heads``."""
    return sorted({mapper(q, num_query_heads, num_key_value_heads) for q in query_heads})


def validate_filters(
    layers: Sequence[LayerLike],
    layer_filter: Sequence[int] | None,
    head_filter: Sequence[int] | None,
) -> list[str]:
    """Return one message per filter entry that names no existing layer or head.

    An empty list means the filters are valid. Head indices are checked against
    the largest ``num_query_heads`` of any layer.
    """
    problems: list[str] = []
    known_layers = sorted({layer.index for layer in layers})
    if layer_filter is not None:
        for index in layer_filter:
            if index not in known_layers:
                problems.append(
                    f"layer {index} does not exist (model has layers {_ranges(known_layers)})"
                )
    if head_filter is not None:
        max_heads = max((layer.num_query_heads for layer in layers), default=0)
        for head in head_filter:
            if not 0 <= head < max_heads:
                problems.append(f"query head {head} does not exist (model has query heads 0..{max_heads - 1})")
    return problems


def _ranges(values: Sequence[int]) -> str:
    """Render sorted ints compactly, e.g. ``0..3, 5``."""
    if not values:
        return "none"
    parts: list[str] = []
    start = prev = values[0]
    for value in [*values[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        if value is not None:
            start = prev = value
    return ", ".join(parts)
