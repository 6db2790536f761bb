"""Example-id normalisation: every dataset row's source example gets a stable int64 id.

The rules here must match the original capture tool bit-for-bit, because the ids
seed the position masks (:mod:`qkcore.seeding`) and are published in the
``example_id`` column of existing datasets.
"""

from __future__ import annotations

import hashlib
import numbers
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from qkcore.layout import low32 as to_int32  # the example_id column value of an id

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _hash_id(value: Any) -> int:
    """Hash ``str(value)`` to a signed 64-bit int (blake2b, 8-byte digest, little endian)."""
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def normalize_example_id(value: Any) -> int:
    """Return the signed int64 id of a dataset example id of any type.

    * integers in the signed int64 range are kept as is;
    * integral floats in that range become the equal int (``7.0 -> 7``);
    * everything else (strings, bools, out-of-range ints, non-integral or
      non-finite floats, ``None``, ...) is hashed from ``str(value)``.

    numpy integer and floating scalars are treated as the Python int/float of the
    same value (so ``np.float32(0.5)`` hashes like ``0.5`` if it is not integral).
    """
    # bool is an int subclass, but the original tool hashes it ("True"/"False");
    # numpy bools are not numbers.Integral, so they reach the string rule anyway.
    if isinstance(value, bool):
        return _hash_id(value)
    if isinstance(value, numbers.Integral):
        as_int = int(value)
        if INT64_MIN <= as_int <= INT64_MAX:
            return as_int
        return _hash_id(as_int)
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Rational):
        # Python float and numpy floating scalars (Fractions/Decimals go to str()).
        as_float = float(value)
        if as_float.is_integer():
            as_int = int(as_float)
            if INT64_MIN <= as_int <= INT64_MAX:
                return as_int
        return _hash_id(as_float)
    return _hash_id(value)



def find_int32_collisions(ids: Iterable[int]) -> dict[int, list[int]]:
    """Map each int32 value hit by more than one distinct id to those ids (sorted).

    The parquet column only holds 32 bits, so distinct 64-bit ids can become
    indistinguishable there; callers warn or fail on these.
    """
    by_low: defaultdict[int, set[int]] = defaultdict(set)
    for example_id in ids:
        by_low[to_int32(example_id)].add(int(example_id))
    return {low: sorted(full) for low, full in sorted(by_low.items()) if len(full) > 1}
