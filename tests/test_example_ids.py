"""Example-id normalisation must match the original tool bit-for-bit."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkcore.example_ids import find_int32_collisions, normalize_example_id, to_int32


def _hashed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_int64_ints_are_kept(value: int) -> None:
    assert normalize_example_id(value) == value


def test_int64_bounds() -> None:
    assert normalize_example_id(2**63 - 1) == 2**63 - 1
    assert normalize_example_id(-(2**63)) == -(2**63)
    assert normalize_example_id(2**63) == _hashed("9223372036854775808")
    assert normalize_example_id(2**63) == -4436916390290898806  # pinned
    assert normalize_example_id(-(2**63) - 1) == _hashed(str(-(2**63) - 1))


def test_integral_floats() -> None:
    assert normalize_example_id(7.0) == 7
    assert type(normalize_example_id(7.0)) is int
    assert normalize_example_id(-3.0) == -3
    assert normalize_example_id(float(-(2**63))) == -(2**63)
    # 2.0**63 is integral but one past int64 max: hashed from its str().
    assert normalize_example_id(2.0**63) == _hashed(str(2.0**63))
    assert normalize_example_id(0.5) == _hashed("0.5") == 237726477914003235
    for odd in (math.inf, -math.inf, math.nan):
        assert normalize_example_id(odd) == _hashed(str(odd))


def test_strings_and_others_are_hashed() -> None:
    assert normalize_example_id("abc") == _hashed("abc") == 6455300059550759896
    assert normalize_example_id("7") == _hashed("7")  # strings are never parsed
    assert normalize_example_id(None) == _hashed("None")
    assert normalize_example_id(True) == _hashed("True") == -9003010673195553747
    assert normalize_example_id(False) == _hashed("False")


def test_numpy_scalars() -> None:
    assert normalize_example_id(np.int64(-5)) == -5
    assert normalize_example_id(np.int32(12)) == 12
    assert normalize_example_id(np.uint64(2**63 + 1)) == _hashed(str(2**63 + 1))
    assert normalize_example_id(np.float64(7.0)) == 7
    assert normalize_example_id(np.float32(7.0)) == 7
    assert normalize_example_id(np.float64(0.5)) == _hashed("0.5")
    assert normalize_example_id(np.bool_(True)) == _hashed("True")


@given(st.text())
def test_any_string_hash_in_int64(text: str) -> None:
    value = normalize_example_id(text)
    assert value == _hashed(text)
    assert -(2**63) <= value < 2**63


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (-1, -1),
        (2**31 - 1, 2**31 - 1),
        (2**31, -(2**31)),
        (2**32 + 5, 5),
        (-(2**31) - 1, 2**31 - 1),
        (-(2**40) + 3, 3),
        (2**63 - 1, -1),
    ],
)
def test_to_int32(value: int, expected: int) -> None:
    assert to_int32(value) == expected


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_to_int32_matches_numpy_cast(value: int) -> None:
    assert to_int32(value) == int(np.array(value, dtype=np.int64).astype(np.int32))


def test_find_int32_collisions() -> None:
    ids = [1, 2**32 + 1, 1, 2, -(2**32) + 1, 3, 2**32 + 3]
    assert find_int32_collisions(ids) == {1: [-(2**32) + 1, 1, 2**32 + 1], 3: [3, 2**32 + 3]}
    assert find_int32_collisions([1, 2, 3, 1]) == {}
    assert find_int32_collisions([]) == {}
