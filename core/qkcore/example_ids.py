"""Example-id normalisation: every dataset row's source example gets a stable int64 id.

The rules here must match the original capture tool bit-for-bit, because the ids
seed the position masks (:mod:`qkcore.seeding`) and are published in the
``example_id`` column of existing datasets.
"""

from __future__ import annotations

import hashlib
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
    """Return the signed int64 id of a dataset example id of any type (the original tool's rule).

    * booleans (``bool``, ``numpy.bool_``) become ``1``/``0``;
    * integers (Python or numpy, any width) in the signed int64 range are kept;
    * integral floats (Python or numpy) in that range become the equal int (``7.0 -> 7``);
    * everything else (strings, ``None``, out-of-range ints, non-integral or
      non-finite floats, ...) is hashed from ``str(value)``, the value as given:
      ``np.float32(0.1)`` hashes ``"0.1"``, as the original tool does, not the
      float64 it widens to.

    Objects with an ``.item()`` method (numpy scalars, one-element arrays,
    tensors) are judged by the Python scalar it returns, as in the original tool.

    One deliberate difference: the original turns an integral float outside the
    int64 range (``1e20``) into an int that its writer then cannot store (it
    crashes with ``OverflowError``), so no published dataset holds one; here it
    is hashed from ``str(value)`` like every other value that is not an int64.
    """
    scalar = value
    if not isinstance(value, (bool, int, float, str)) and hasattr(value, "item"):
        try:
            scalar = value.item()
        except Exception:  # e.g. an array of several values: hashed from its str() below
            scalar = value
    if isinstance(scalar, bool):
        return int(scalar)
    if isinstance(scalar, int):
        as_int = int(scalar)  # an int subclass (IntEnum, ...) counts by its value
        return as_int if INT64_MIN <= as_int <= INT64_MAX else _hash_id(as_int)
    if isinstance(scalar, float) and scalar.is_integer():
        as_int = int(scalar)
        if INT64_MIN <= as_int <= INT64_MAX:
            return as_int
    return _hash_id(value)


#: How example ids are turned into the 64-bit id and the ``example_id`` column (for the dataset card).
EXAMPLE_ID_RULE = (
    "booleans become 1/0; integers in the int64 range and integral floats in it are kept (numpy scalars by "
    "their value); anything else becomes blake2b(str(v).encode('utf-8'), digest_size=8) read little-endian "
    "as a signed int64. The 64-bit id seeds the sampler; the example_id column holds its low 32 bits as a "
    "signed int32."
)


def find_int32_collisions(ids: Iterable[int]) -> dict[int, list[int]]:
    """Map each int32 value hit by more than one distinct id to those ids (sorted).

    The parquet column only holds 32 bits, so distinct 64-bit ids can become
    indistinguishable there; callers warn or fail on these.
    """
    by_low: defaultdict[int, set[int]] = defaultdict(set)
    for example_id in ids:
        by_low[to_int32(example_id)].add(int(example_id))
    return {low: sorted(full) for low, full in sorted(by_low.items()) if len(full) > 1}
