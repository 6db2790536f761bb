"""Example-id normalisation must match the original tool bit-for-bit (values pinned from its own code)."""

from __future__ import annotations

import hashlib
import math
from decimal import Decimal
from fractions import Fraction

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


#: Every value below was run through the original tool's ``_normalize_example_ids`` (its
#: sniff.py, in a scratch copy): the expected ids are its outputs, pinned.
ORIGINAL_IDS = [
        pytest.param(0, 0, id='0'),
        pytest.param(1, 1, id='1'),
        pytest.param(-1, -1, id='-1'),
        pytest.param(7, 7, id='7'),
        pytest.param(2**31 - 1, 2147483647, id='2**31 - 1'),
        pytest.param(2**31, 2147483648, id='2**31'),
        pytest.param(2**32 + 5, 4294967301, id='2**32 + 5'),
        pytest.param(2**63 - 1, 9223372036854775807, id='2**63 - 1'),
        pytest.param(-(2**63), -9223372036854775808, id='-(2**63)'),
        pytest.param(2**63, -4436916390290898806, id='2**63'),
        pytest.param(-(2**63) - 1, -4339246775071979676, id='-(2**63) - 1'),
        pytest.param(2**64, 4703322702048383463, id='2**64'),
        pytest.param(2**64 - 1, -5683783729508659220, id='2**64 - 1'),
        pytest.param(10**30, -2146573268950001209, id='10**30'),
        pytest.param(-(10**30), 1201269592203246224, id='-(10**30)'),
        pytest.param(True, 1, id='True'),
        pytest.param(False, 0, id='False'),
        pytest.param(0.0, 0, id='0.0'),
        pytest.param(-0.0, 0, id='-0.0'),
        pytest.param(7.0, 7, id='7.0'),
        pytest.param(-3.0, -3, id='-3.0'),
        pytest.param(0.5, 237726477914003235, id='0.5'),
        pytest.param(-2.5, -2627011889147779100, id='-2.5'),
        pytest.param(0.1, -3381052176717887547, id='0.1'),
        pytest.param(1 / 3, -3229220927106041115, id='1 / 3'),
        pytest.param(1e15, 1000000000000000, id='1e15'),
        pytest.param(2.0**53, 9007199254740992, id='2.0**53'),
        pytest.param(2.0**62, 4611686018427387904, id='2.0**62'),
        pytest.param(float(-(2**63)), -9223372036854775808, id='float(-(2**63))'),
        pytest.param(5e-324, 6496388845334852520, id='5e-324'),
        pytest.param(math.nan, -8627545895207964445, id='math.nan'),
        pytest.param(math.inf, -5588484317519847408, id='math.inf'),
        pytest.param(-math.inf, -1517694443264964789, id='-math.inf'),
        pytest.param(np.int8(-5), -5, id='np.int8(-5)'),
        pytest.param(np.int16(300), 300, id='np.int16(300)'),
        pytest.param(np.int32(-(2**31)), -2147483648, id='np.int32(-(2**31))'),
        pytest.param(np.int64(2**63 - 1), 9223372036854775807, id='np.int64(2**63 - 1)'),
        pytest.param(np.int64(-(2**63)), -9223372036854775808, id='np.int64(-(2**63))'),
        pytest.param(np.uint8(255), 255, id='np.uint8(255)'),
        pytest.param(np.uint16(65535), 65535, id='np.uint16(65535)'),
        pytest.param(np.uint32(2**32 - 1), 4294967295, id='np.uint32(2**32 - 1)'),
        pytest.param(np.uint64(5), 5, id='np.uint64(5)'),
        pytest.param(np.uint64(2**63), -4436916390290898806, id='np.uint64(2**63)'),
        pytest.param(np.uint64(2**64 - 1), -5683783729508659220, id='np.uint64(2**64 - 1)'),
        pytest.param(np.float16(7.0), 7, id='np.float16(7.0)'),
        pytest.param(np.float16(0.5), 237726477914003235, id='np.float16(0.5)'),
        pytest.param(np.float16(0.1), -3381052176717887547, id='np.float16(0.1)'),
        pytest.param(np.float16(-2.0), -2, id='np.float16(-2.0)'),
        pytest.param(np.float16("nan"), -8627545895207964445, id='np.float16("nan")'),
        pytest.param(np.float16("inf"), -5588484317519847408, id='np.float16("inf")'),
        pytest.param(np.float32(7.0), 7, id='np.float32(7.0)'),
        pytest.param(np.float32(0.1), -3381052176717887547, id='np.float32(0.1)'),
        pytest.param(np.float32(0.5), 237726477914003235, id='np.float32(0.5)'),
        pytest.param(np.float32(1 / 3), -2581052599761145175, id='np.float32(1 / 3)'),
        pytest.param(np.float32(16777217.0), 16777216, id='np.float32(16777217.0)'),
        pytest.param(np.float32(-(2.0**63)), -9223372036854775808, id='np.float32(-(2.0**63))'),
        pytest.param(np.float32("nan"), -8627545895207964445, id='np.float32("nan")'),
        pytest.param(np.float32("-inf"), -1517694443264964789, id='np.float32("-inf")'),
        pytest.param(np.float64(7.0), 7, id='np.float64(7.0)'),
        pytest.param(np.float64(0.1), -3381052176717887547, id='np.float64(0.1)'),
        pytest.param(np.float64(0.5), 237726477914003235, id='np.float64(0.5)'),
        pytest.param(np.float64("nan"), -8627545895207964445, id='np.float64("nan")'),
        pytest.param(np.float64("inf"), -5588484317519847408, id='np.float64("inf")'),
        pytest.param(np.bool_(True), 1, id='np.bool_(True)'),
        pytest.param(np.bool_(False), 0, id='np.bool_(False)'),
        pytest.param(np.array(5), 5, id='np.array(5)'),
        pytest.param(np.array(0.25), 1876469693443868515, id='np.array(0.25)'),
        pytest.param(np.array(True), 1, id='np.array(True)'),
        pytest.param(np.array([9]), 9, id='np.array([9])'),
        pytest.param(np.array([1, 2]), -2165424905013143315, id='np.array([1, 2])'),
        pytest.param(np.str_("abc"), 6455300059550759896, id='np.str_("abc")'),
        pytest.param("abc", 6455300059550759896, id='"abc"'),
        pytest.param("7", -9038873097560174361, id='"7"'),
        pytest.param("", -5426141060434712860, id='""'),
        pytest.param("True", -9003010673195553747, id='"True"'),
        pytest.param("1.5", 3831814941423113338, id='"1.5"'),
        pytest.param("None", 25992921519320915, id='"None"'),
        pytest.param("é✓", -2116258686593620882, id='"é✓"'),
        pytest.param(None, 25992921519320915, id='None'),
        pytest.param(Decimal("7"), -9038873097560174361, id='Decimal("7")'),
        pytest.param(Decimal("1.5"), 3831814941423113338, id='Decimal("1.5")'),
        pytest.param(Fraction(1, 2), 5158077907736568049, id='Fraction(1, 2)'),
        pytest.param(Fraction(4, 2), 7813587015057732635, id='Fraction(4, 2)'),
        pytest.param(b"ab", -2745174649186590977, id='b"ab"'),
        pytest.param([1, 2], 5797740730781989236, id='[1, 2]'),
]


@pytest.mark.parametrize(("value", "expected"), ORIGINAL_IDS)
def test_matches_the_original_tool(value, expected: int) -> None:  # type: ignore[no-untyped-def]
    got = normalize_example_id(value)
    assert got == expected and type(got) is int


def test_booleans_are_one_and_zero_not_hashed() -> None:
    # The original keeps bools (Python and numpy) as 1/0, so True collides with the id 1 by design.
    for true in (True, np.bool_(True), np.array(True)):
        assert normalize_example_id(true) == 1 == normalize_example_id(1)
    for false in (False, np.bool_(False)):
        assert normalize_example_id(false) == 0
    assert normalize_example_id("True") == _hashed("True")  # the string is still hashed


def test_non_integral_numpy_floats_hash_their_own_str() -> None:
    # np.float32(0.1) prints as "0.1" (its shortest repr), not the float64 it widens to.
    assert normalize_example_id(np.float32(0.1)) == _hashed("0.1") == normalize_example_id(0.1)
    assert normalize_example_id(np.float16(0.1)) == _hashed("0.1")
    assert normalize_example_id(np.float32(1 / 3)) == _hashed("0.33333334")
    assert normalize_example_id(np.float32(1 / 3)) != _hashed(str(float(np.float32(1 / 3))))


@pytest.mark.parametrize(
    ("value", "text", "expected"),
    [
        (2.0**63, "9.223372036854776e+18", -823008579365768791),
        (-(2.0**64), "-1.8446744073709552e+19", 4330149757397957453),
        (1e20, "1e+20", 8787335628747583656),
        (1e300, "1e+300", -5357779263073494694),
        (np.float32(2.0**63), "9.223372e+18", -5162649522718544648),
        (np.float32(1e20), "1e+20", 8787335628747583656),
        (np.float64(2.0**63), "9.223372036854776e+18", -823008579365768791),
    ],
)
def test_integral_floats_outside_int64_are_hashed(value, text: str, expected: int) -> None:  # type: ignore[no-untyped-def]
    # The original turns these into ints its writer cannot store (OverflowError, no dataset has
    # one); qkcore hashes them from str(value) like every other value that is not an int64.
    assert normalize_example_id(value) == _hashed(text) == expected


def test_int_subclasses_count_by_value() -> None:
    import enum

    class Code(enum.IntEnum):
        A = 7

    assert normalize_example_id(Code.A) == 7


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


def test_readme_compatibility_table_states_the_differences_from_sniff_qk() -> None:
    # Both behaviours differ from the original tool on purpose; the README's table must say so.
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| **Differs on purpose** |"))
    assert "`capture.full_attention_only: true` is refused" in row and "exits 0" in row
    assert "2^63 or more" in row and "hashed" in row
