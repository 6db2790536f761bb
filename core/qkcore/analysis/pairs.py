"""Causal, window-aware sampling of same-example key pairs for one query bucket.

Rules for query bucket ``t`` (see :func:`eligible_keys`):

* both keys come from the same ``example_id``;
* only keys in buckets ``c < t`` are eligible (causal);
* with a sliding window of ``w`` tokens, a key is eligible only if some query
  of the bucket can attend to it. transformers' sliding mask lets a query at
  position ``p`` see keys at ``p - w < k <= p``, and the bucket's earliest
  query (``bucket_start``) reaches furthest back, so the rule is
  ``position > bucket_start - w``. It is applied by position, never by whole
  buckets: a window narrower than a bucket keeps only the tail of the
  previous bucket, and a key no query of the bucket can see is never paired.

Sampling (see :func:`sample_key_pairs`): an example with probability
proportional to its number of eligible keys, an anchor uniformly among them,
and a neighbour uniformly among the other eligible keys of the example within
``locality`` positions of the anchor, where ``locality = floor(frac *
(max captured key position of the example + 1))`` (``frac = 0.05`` as in the
original analysis). If no key falls within that bound the nearest key by
position is used, so the neighbourhood always holds at least one key. A pair
never repeats a key; the order inside a pair is randomised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["DEFAULT_LOCALITY", "KeyIndex", "eligible_keys", "sample_key_pairs"]

I64 = NDArray[np.int64]

#: Fraction of an example's captured length that bounds the neighbour distance.
DEFAULT_LOCALITY = 0.05


@dataclass(frozen=True)
class KeyIndex:
    """Key rows of one key head, sorted once for repeated per-bucket sampling.

    ``order`` lists row indices sorted by ``(example_id, position)``;
    ``example_max_position`` is, per row, the largest captured key position of
    that row's example.
    """

    bucket: I64
    example_id: I64
    position: I64
    order: I64
    example_max_position: I64

    @classmethod
    def build(cls, bucket: NDArray[np.integer], example_id: NDArray[np.integer], position: NDArray[np.integer]) -> KeyIndex:
        """Index key rows given their ``bucket``, ``example_id`` and ``position`` columns."""
        b = np.asarray(bucket, dtype=np.int64)
        e = np.asarray(example_id, dtype=np.int64)
        p = np.asarray(position, dtype=np.int64)
        order = np.lexsort((p, e)).astype(np.int64)
        if e.size:
            _, inverse = np.unique(e, return_inverse=True)
            max_pos = np.full(inverse.max() + 1, np.iinfo(np.int64).min)
            np.maximum.at(max_pos, inverse, p)
            ex_max = max_pos[inverse]
        else:
            ex_max = np.zeros(0, dtype=np.int64)
        return cls(b, e, p, order, ex_max)

    def __len__(self) -> int:
        return int(self.bucket.size)


def eligible_keys(keys: KeyIndex, query_bucket: int, window: int | None = None, bucket_start: int | None = None) -> NDArray[np.bool_]:
    """Boolean mask of the key rows a query in ``query_bucket`` may be paired with.

    ``bucket_start`` is the earliest position of the query bucket; it is needed
    only when ``window`` is set (see the module docstring for the rule).
    """
    mask = keys.bucket < query_bucket
    if window is not None:
        if bucket_start is None:
            raise ValueError("bucket_start is required with a sliding window")
        mask &= keys.position > bucket_start - window
    return mask


def sample_key_pairs(
    keys: KeyIndex,
    query_bucket: int,
    n_pairs: int,
    rng: np.random.Generator,
    *,
    window: int | None = None,
    bucket_start: int | None = None,
    locality: float = DEFAULT_LOCALITY,
) -> I64:
    """Draw ``n_pairs`` key pairs for ``query_bucket``; return row indices, shape ``(n, 2)``.

    Returns an empty ``(0, 2)`` array when no example has two eligible keys.
    Pairs are drawn with replacement (a pair may recur across draws); within a
    pair the two keys always differ.
    """
    empty = np.zeros((0, 2), dtype=np.int64)
    mask = eligible_keys(keys, query_bucket, window, bucket_start)
    # Eligible rows in (example, position) order: each example is a contiguous run.
    sel = keys.order[mask[keys.order]]
    if sel.size < 2 or n_pairs <= 0:
        return empty
    ex = keys.example_id[sel]
    starts = np.flatnonzero(np.r_[True, ex[1:] != ex[:-1]])
    counts = np.diff(np.r_[starts, sel.size])
    usable = np.flatnonzero(counts >= 2)
    if usable.size == 0:
        return empty

    weights = counts[usable].astype(np.float64)
    group = rng.choice(usable, size=n_pairs, p=weights / weights.sum())
    anchor = starts[group] + rng.integers(0, counts[group])

    pos = keys.position[sel]
    bound = np.floor(locality * (keys.example_max_position[sel] + 1)).astype(np.int64)
    # Composite sort key (group, position): a stride wider than any position
    # plus bound stops the searchsorted windows leaking into the next example.
    group_of = np.repeat(np.arange(starts.size, dtype=np.int64), counts)
    stride = int(pos.max()) + 2 * int(bound.max()) + 2
    comp = group_of * stride + pos
    lo = np.searchsorted(comp, comp[anchor] - bound[anchor], side="left")
    hi = np.searchsorted(comp, comp[anchor] + bound[anchor], side="right")
    n_cand = hi - lo - 1  # excluding the anchor itself

    # Within the bound: uniform over the candidates, skipping the anchor.
    pick = lo + rng.integers(0, np.maximum(n_cand, 1))
    pick = pick + (pick >= anchor)
    # Nothing within the bound: nearest key by position (ties broken at random).
    nearest = _nearest_neighbour(anchor, starts[group], starts[group] + counts[group], pos, rng)
    neighbour = np.where(n_cand >= 1, pick, nearest)

    swap = rng.random(n_pairs) < 0.5
    first = np.where(swap, neighbour, anchor)
    second = np.where(swap, anchor, neighbour)
    return np.stack([sel[first], sel[second]], axis=1).astype(np.int64)


def _nearest_neighbour(anchor: I64, begin: I64, end: I64, pos: I64, rng: np.random.Generator) -> I64:
    """Index of the closer of the anchor's two sorted neighbours inside ``[begin, end)``."""
    left = anchor - 1
    right = anchor + 1
    has_left = left >= begin
    has_right = right < end
    big = np.iinfo(np.int64).max
    d_left = np.where(has_left, pos[anchor] - pos[np.maximum(left, 0)], big)
    d_right = np.where(has_right, pos[np.minimum(right, pos.size - 1)] - pos[anchor], big)
    coin = rng.random(anchor.size) < 0.5
    take_left = (d_left < d_right) | ((d_left == d_right) & coin)
    return np.where(take_left, left, right)
