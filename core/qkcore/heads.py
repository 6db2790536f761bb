"""Which query heads to capture, and which key heads they attend with.

Head sampling lists candidate ``(layer, query head)`` pairs layer-major (layers in
decoder order, heads ascending) and, when there are more than ``count``, picks
``random.Random(seed).sample(candidates, count)``: the original capture tool's
call, so the same candidate list gives the same heads as its published datasets.

Which layers give candidates is the rule (``capture.head_sampling.candidates``):

* ``eligible_layers`` (default): the layers that can be captured (never
  cross-attention; full attention only under ``full_attention_only``), so
  ``count`` heads are captured.
* ``all_decoder_layers``: the original tool's list, every decoder layer including
  cross-attention ones (``full_attention_only`` still drops sliding layers); the
  picks that land on cross-attention layers are never captured, so fewer than
  ``count`` heads may be. For models without cross-attention both rules agree;
  for Llama 3.2 Vision only this one reproduces the original's datasets.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

#: The values of ``capture.head_sampling.candidates``.
CandidateRule = Literal["eligible_layers", "all_decoder_layers"]


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

#: The generic GQA rule of :func:`key_head_for`, in words (cards, logs, docs).
GQA_RULE = "q // (n_q // n_kv)"


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


@dataclass(frozen=True)
class HeadSelection:
    """The query heads chosen for capture, and what they were chosen from."""

    #: Captured query heads: ``{layer index: sorted heads}``, ascending keys, no empty layers.
    heads: dict[int, list[int]]
    rule: CandidateRule
    #: Candidate ``(layer, head)`` pairs and the layers they come from.
    candidates: int
    candidate_layers: int
    #: ``capture.head_sampling.count`` (``None``: no sampling) and seed.
    count: int | None
    seed: int
    #: Picks on cross-attention layers, which are never captured (``all_decoder_layers`` only).
    uncaptured_picks: int = 0
    #: Indices of the layers the candidates come from, in order.
    candidate_layer_indices: tuple[int, ...] = ()

    @property
    def num_heads(self) -> int:
        """Number of captured query heads."""
        return sum(len(heads) for heads in self.heads.values())

    @property
    def pairs(self) -> set[tuple[int, int]]:
        """The captured ``(layer, query head)`` pairs."""
        return {(layer, head) for layer, heads in self.heads.items() for head in heads}

    def describe(self) -> str:
        """One line saying how the query heads were chosen (for the card and ``qkcore plan``)."""
        if self.count is None:
            return (
                f"all {self.num_heads} query heads of the {self.candidate_layers} eligible layers "
                "(no capture.head_sampling)"
            )
        where = (
            f"all {self.candidate_layers} decoder layers, cross-attention included as in the original sniff-qk"
            if self.rule == "all_decoder_layers"
            else f"the {self.candidate_layers} eligible layers"
        )
        if self.count >= self.candidates:
            text = f"all {self.candidates} candidate query heads of {where} (count {self.count} >= candidates)"
        else:
            text = (
                f"{self.count} of {self.candidates} candidate query heads of {where}, "
                f"picked by random.Random({self.seed}).sample"
            )
        text += f" (capture.head_sampling.candidates: {self.rule})"
        if self.uncaptured_picks:
            text += (
                f"; {self.uncaptured_picks} picks on cross-attention layers are not captured, "
                f"leaving {self.num_heads} query heads"
            )
        return text


def sample_query_heads(
    layers: Sequence[LayerLike],
    *,
    layer_filter: Sequence[int] | None,
    head_filter: Sequence[int] | None,
    full_attention_only: bool,
    count: int | None,
    seed: int = 0,
    candidates: CandidateRule = "eligible_layers",
) -> HeadSelection:
    """Pick the ``(layer, query head)`` pairs to capture (see the module docstring for the rules).

    Candidates are listed layer-major (layers in the given order, heads ascending)
    from the layers the rule admits that pass the filters; when there are more than
    ``count`` of them, ``random.Random(seed).sample(candidates, count)`` picks the
    subset. Picks on cross-attention layers are then dropped.
    """
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0 or None, got {count}")
    if candidates not in ("eligible_layers", "all_decoder_layers"):
        raise ValueError(f"unknown candidate rule {candidates!r}")
    layer_set = None if layer_filter is None else set(layer_filter)
    head_set = None if head_filter is None else set(head_filter)
    cross = {layer.index for layer in layers if layer.kind == "cross"}
    pairs: list[tuple[int, int]] = []
    candidate_layers: list[int] = []
    for layer in layers:
        if layer.kind == "cross" and candidates == "eligible_layers":
            continue  # cross-attention is never captured
        # The original tool only knows sliding layers; cross-attention layers stay its candidates.
        if full_attention_only and layer.kind == "sliding":
            continue
        if layer_set is not None and layer.index not in layer_set:
            continue
        heads = [head for head in range(layer.num_query_heads) if head_set is None or head in head_set]
        if heads:
            candidate_layers.append(layer.index)
        pairs.extend((layer.index, head) for head in heads)
    # The candidate order above is part of the contract: sample() depends on it.
    chosen = pairs
    if count is not None and len(pairs) > count:
        chosen = random.Random(seed).sample(pairs, count)
    selected: dict[int, set[int]] = {}
    uncaptured = 0
    for layer_index, head in chosen:
        if layer_index in cross:
            uncaptured += 1
            continue
        selected.setdefault(layer_index, set()).add(head)
    return HeadSelection(
        heads={layer_index: sorted(selected[layer_index]) for layer_index in sorted(selected)},
        rule=candidates,
        candidates=len(pairs),
        candidate_layers=len(candidate_layers),
        count=count,
        seed=seed,
        uncaptured_picks=uncaptured,
        candidate_layer_indices=tuple(candidate_layers),
    )


def map_key_heads(
    query_heads: Iterable[int],
    num_query_heads: int,
    num_key_value_heads: int,
    mapper: KeyHeadMapper = key_head_for,
) -> dict[int, int]:
    """Return ``{query head: key head}`` for ``query_heads``, by ``mapper``.

    ``mapper`` is the family's mapping (:meth:`qkcore.plugins.Family.key_head`, its
    ``qkcore_key_head`` hook); by default the generic GQA rule, :func:`key_head_for`.
    The distinct key heads to capture are ``sorted(set(result.values()))``.
    """
    return {q: mapper(q, num_query_heads, num_key_value_heads) for q in query_heads}


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
