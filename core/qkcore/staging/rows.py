"""One config's rows as numpy columns, and their sort order.

The sort key of a row is ``(example_id, 64-bit id, position)``: the visible int32
column first makes the final file sorted on disk; the 64-bit id second keeps two
documents whose int32 ids collide contiguous. Sorting is stable (``np.lexsort``):
rows with equal keys keep their arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from qkcore.layout import low32, low32_ids

INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)

Key = tuple[int, int, int]  # (low 32 bits of id as int32, 64-bit id, position): the sort key


@dataclass
class Rows:
    """Columnar rows of one config, as numpy arrays (buffering, spilling, sorting)."""

    ids64: np.ndarray  # int64
    positions: np.ndarray  # int32
    buckets: np.ndarray  # int32
    vectors: np.ndarray  # float32, (n, head_dim)
    tokens: np.ndarray | None = None  # object (str), (n,): the token_str column, when captured

    @classmethod
    def concat(cls, parts: Sequence[Rows], head_dim: int, tokens: bool = False) -> Rows:
        """``parts`` one after the other (no rows: empty columns of the right shape)."""
        if not parts:
            return cls(
                np.empty(0, np.int64),
                np.empty(0, np.int32),
                np.empty(0, np.int32),
                np.empty((0, head_dim), np.float32),
                np.empty(0, object) if tokens else None,
            )
        if len(parts) == 1:
            return parts[0]
        return cls(
            np.concatenate([p.ids64 for p in parts]),
            np.concatenate([p.positions for p in parts]),
            np.concatenate([p.buckets for p in parts]),
            np.concatenate([p.vectors for p in parts]),
            np.concatenate([p.tokens for p in parts]) if parts[0].tokens is not None else None,
        )

    def __len__(self) -> int:
        return len(self.ids64)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (token strings estimated)."""
        # Token strings: the pointers plus a typical short token (an estimate; they are small).
        text = 0 if self.tokens is None else self.tokens.nbytes + 56 * len(self.tokens)
        return self.ids64.nbytes + self.positions.nbytes + self.buckets.nbytes + self.vectors.nbytes + text

    def take(self, index: np.ndarray | slice) -> Rows:
        """Rows selected by a mask, an index array (copies) or a slice (views)."""
        tokens = None if self.tokens is None else self.tokens[index]
        return Rows(self.ids64[index], self.positions[index], self.buckets[index], self.vectors[index], tokens)

    def copy(self) -> Rows:
        """A copy that shares no memory with ``self``."""
        tokens = None if self.tokens is None else self.tokens.copy()
        return Rows(self.ids64.copy(), self.positions.copy(), self.buckets.copy(), self.vectors.copy(), tokens)

    @classmethod
    def sorted_concat(cls, parts: Sequence[Rows], head_dim: int, tokens: bool = False) -> Rows:
        """``parts`` concatenated and sorted by key, copying the vectors only once."""
        if not parts:
            return cls.concat([], head_dim, tokens)
        order, ids64, positions, buckets = sorted_columns(parts)
        text = np.concatenate([p.tokens for p in parts])[order] if parts[0].tokens is not None else None
        return cls(ids64, positions, buckets, gather([p.vectors for p in parts], order, head_dim), text)

    def within(self, lo: Key, hi: Key) -> np.ndarray:
        """Mask of rows whose sort key lies in ``[lo, hi]`` (lexicographic)."""
        id32, id64, pos = low32_ids(self.ids64), self.ids64, self.positions

        def below(k: Key) -> np.ndarray:
            return (id32 < k[0]) | ((id32 == k[0]) & ((id64 < k[1]) | ((id64 == k[1]) & (pos < k[2]))))

        def above(k: Key) -> np.ndarray:
            return (id32 > k[0]) | ((id32 == k[0]) & ((id64 > k[1]) | ((id64 == k[1]) & (pos > k[2]))))

        return ~below(lo) & ~above(hi)


def sort_order(ids64: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Order by (int32 id, 64-bit id, position); np.lexsort is stable, so ties keep arrival order."""
    return np.lexsort((positions, ids64, low32_ids(ids64)))


def sorted_columns(parts: Sequence[Rows]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sort order of ``parts`` concatenated, and their id/position/bucket columns in that order."""
    ids64 = np.concatenate([p.ids64 for p in parts])
    positions = np.concatenate([p.positions for p in parts])
    order = sort_order(ids64, positions)
    return order, ids64[order], positions[order], np.concatenate([p.buckets for p in parts])[order]


def key_at(ids64: np.ndarray, positions: np.ndarray, i: int) -> Key:
    """The sort key of row ``i``."""
    return (low32(int(ids64[i])), int(ids64[i]), int(positions[i]))


def gather(parts: Sequence[np.ndarray], index: np.ndarray, head_dim: int) -> np.ndarray:
    """``np.concatenate(parts)[index]`` without materialising the concatenation (memory bound)."""
    if len(parts) == 1:
        return parts[0][index]
    out = np.empty((len(index), head_dim), np.float32)
    starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
    which = np.searchsorted(starts, index, side="right") - 1
    for c in np.unique(which):
        sel = which == c
        out[sel] = parts[c][index[sel] - starts[c]]
    return out


def to_int32(values: np.ndarray, what: str) -> np.ndarray:
    """Checked int64 -> int32 conversion; never wrap silently."""
    values = np.asarray(values)
    if values.size and (int(values.min()) < INT32_MIN or int(values.max()) > INT32_MAX):
        raise ValueError(
            f"{what} out of int32 range [{int(values.min())}, {int(values.max())}]"
        )
    return values.astype(np.int32)
