"""The bounded external merge: one config's rows from every part, in sort order, a budget at a time.

:func:`sorted_runs` never loads a whole config. It splits the config, in sort order,
into consecutive key ranges of at most ``budget`` rows (whole documents, or position
ranges of a document larger than that; per-document counts come from the part
indexes), gathers each range from the part batches that overlap it and sorts it. Only
a single (document, position) key repeated over ``budget`` rows can exceed it (a range
cannot split one key). Sorting is stable and parts are read in arrival order, so rows
with equal keys keep their arrival order.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from qkcore.layout import low32, low32_ids
from qkcore.staging.parts import Slice, iter_range
from qkcore.staging.rows import INT32_MAX, INT32_MIN, Key, Rows


def sorted_runs(slices: Sequence[Slice], budget: int, head_dim: int, tokens: bool) -> Iterator[Rows]:
    """The config held in ``slices``, in sort order, as sorted runs of at most ``budget`` rows each."""
    for lo, hi in plan_ranges(slices, budget, head_dim):
        yield Rows.sorted_concat(list(iter_range(slices, lo, hi, head_dim)), head_dim, tokens)


def plan_ranges(slices: Sequence[Slice], budget: int, head_dim: int) -> list[tuple[Key, Key]]:
    """Consecutive key ranges of at most ``budget`` rows that cover the config in sort order."""
    if not slices:
        return []
    docs, inverse = np.unique(np.concatenate([s.ids for s in slices]), return_inverse=True)
    totals = np.zeros(len(docs), np.int64)
    np.add.at(totals, inverse, np.concatenate([s.counts for s in slices]))
    order = np.lexsort((docs, low32_ids(docs)))
    docs, totals = docs[order], totals[order]
    ranges: list[tuple[Key, Key]] = []
    for start, end in pack(totals, budget):
        first, last = int(docs[start]), int(docs[end - 1])
        if end - start > 1 or totals[start] <= budget:
            ranges.append(((low32(first), first, INT32_MIN), (low32(last), last, INT32_MAX)))
            continue
        # One document larger than the budget: split it by position (reading positions only).
        k32 = low32(first)
        lo, hi = (k32, first, INT32_MIN), (k32, first, INT32_MAX)
        positions = np.concatenate([r.positions.copy() for r in iter_range(slices, lo, hi, head_dim)])
        values, counts = np.unique(positions, return_counts=True)
        for a, b in pack(counts, budget):
            ranges.append(((k32, first, int(values[a])), (k32, first, int(values[b - 1]))))
    return ranges


def pack(sizes: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Greedy ``[start, end)`` spans of consecutive items summing to <= budget (an oversize item alone)."""
    cum = np.cumsum(sizes)
    spans: list[tuple[int, int]] = []
    start, base = 0, 0
    while start < len(sizes):
        end = max(start + 1, int(np.searchsorted(cum, base + budget, side="right")))
        spans.append((start, end))
        base, start = int(cum[end - 1]), end
    return spans
