"""Sampler bucket/p_keep rules and mask drawing, which must match the original tool."""

from __future__ import annotations

import math
import struct

import pluggy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkcore import builtin, hookspecs
from qkcore.samplers import (
    AllSampler,
    LogUniformSampler,
    Sampler,
    UniformSampler,
    floor_log2_plus_one,
    keep_indices,
    keep_mask,
)
from qkcore.seeding import mask_generator

positions_st = st.integers(min_value=0, max_value=2**63 - 1)
sizes_st = st.integers(min_value=1, max_value=2**20)
rates_st = st.floats(min_value=1e-6, max_value=1e4, allow_nan=False, allow_infinity=False)
samplers_st = st.sampled_from([UniformSampler, LogUniformSampler, AllSampler])


def _t(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _py_log_bucket(p: int, min_bucket_size: int) -> int:
    return max((p + 1).bit_length() - 1, (min_bucket_size - 1).bit_length())


# --- bucket math at edge positions -------------------------------------------------


def test_uniform_buckets_edges() -> None:
    s = UniformSampler(base_rate=1.0, min_bucket_size=4)
    got = s.buckets(_t([0, 3, 4, 7, 8, 2**40, 2**40 + 3, 2**63 - 1])).tolist()
    assert got == [0, 0, 1, 1, 2, 2**38, 2**38, (2**63 - 1) // 4]
    one = UniformSampler(base_rate=1.0, min_bucket_size=1)
    assert one.buckets(_t([0, 1, 2**40])).tolist() == [0, 1, 2**40]


def test_log_uniform_buckets_edges() -> None:
    s = LogUniformSampler(base_rate=1.0, min_bucket_size=1)
    ps = [0, 1, 2, 3, 6, 7, 14, 15, 2**40 - 2, 2**40 - 1, 2**40, 2**53 - 2, 2**53 - 1, 2**60 - 2, 2**60 - 1]
    assert s.buckets(_t(ps)).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 39, 40, 40, 52, 53, 59, 60]
    assert s.buckets(_t([2**63 - 1])).tolist() == [63]
    # Float log2 rounds 2**60 - 1 up to 2**60 and gets the bucket wrong; ours must not.
    assert math.floor(math.log2(float(2**60 - 2 + 1))) == 60


@pytest.mark.parametrize(
    ("size", "m"), [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4), (2**40, 40), (2**40 + 1, 41)]
)
def test_log_uniform_min_bucket(size: int, m: int) -> None:
    s = LogUniformSampler(base_rate=1.0, min_bucket_size=size)
    assert s.min_bucket == m
    assert s.buckets(_t([0]))[0].item() == m


def test_log_uniform_min_bucket_merges_low_positions() -> None:
    s = LogUniformSampler(base_rate=2.0, min_bucket_size=4)  # m = 2
    assert s.buckets(_t([0, 1, 2, 3, 6, 7])).tolist() == [2, 2, 2, 2, 2, 3]
    assert s.keep_probability(_t([0, 6, 7, 15])).tolist() == [0.5, 0.5, 0.25, 0.125]


def test_all_buckets_like_uniform() -> None:
    ps = _t([0, 5, 9, 2**40])
    assert torch.equal(AllSampler(base_rate=0.1, min_bucket_size=5).buckets(ps), _t([0, 1, 1, 2**40 // 5]))
    assert AllSampler(base_rate=0.1, min_bucket_size=5).keep_probability(ps).tolist() == [1.0] * 4


def test_dtypes_and_bad_positions() -> None:
    for cls in (UniformSampler, LogUniformSampler, AllSampler):
        s = cls(base_rate=0.5, min_bucket_size=2)
        assert s.buckets(torch.arange(5, dtype=torch.int32)).dtype == torch.int64
        assert s.keep_probability(torch.arange(5)).dtype == torch.float64
        with pytest.raises(TypeError):
            s.buckets(torch.tensor([1.0]))
        with pytest.raises(ValueError):
            s.buckets(_t([-1]))


@given(st.lists(positions_st, max_size=50))
def test_floor_log2_exact(ps: list[int]) -> None:
    assert floor_log2_plus_one(_t(ps)).tolist() == [(p + 1).bit_length() - 1 for p in ps]


# --- properties ----------------------------------------------------------------------


@given(samplers_st, rates_st, sizes_st, st.lists(positions_st, min_size=1, max_size=40))
def test_buckets_monotone_and_p_keep_in_range(cls: type[Sampler], rate: float, size: int, ps: list[int]) -> None:
    s = cls(base_rate=rate, min_bucket_size=size)
    ordered = _t(sorted(ps))
    buckets = s.buckets(ordered)
    assert buckets.dtype == torch.int64
    assert bool((buckets[1:] >= buckets[:-1]).all())
    p_keep = s.keep_probability(ordered)
    assert bool(((p_keep >= 0) & (p_keep <= 1)).all())


@given(rates_st, sizes_st, st.lists(positions_st, min_size=1, max_size=40))
def test_log_uniform_rule(rate: float, size: int, ps: list[int]) -> None:
    s = LogUniformSampler(base_rate=rate, min_bucket_size=size)
    assert s.buckets(_t(ps)).tolist() == [_py_log_bucket(p, size) for p in ps]
    expected = [float(min(1, rate / 2 ** _py_log_bucket(p, size))) for p in ps]
    assert s.keep_probability(_t(ps)).tolist() == expected  # exact, not approx


@given(rates_st, sizes_st, st.lists(positions_st, min_size=1, max_size=20))
def test_uniform_rule(rate: float, size: int, ps: list[int]) -> None:
    s = UniformSampler(base_rate=rate, min_bucket_size=size)
    assert s.buckets(_t(ps)).tolist() == [p // size for p in ps]
    assert s.keep_probability(_t(ps)).tolist() == [float(min(1, rate / size))] * len(ps)


@given(rates_st, st.lists(positions_st, min_size=1, max_size=20))
def test_uniform_min_bucket_size_one(rate: float, ps: list[int]) -> None:
    s = UniformSampler(base_rate=rate, min_bucket_size=1)
    assert s.buckets(_t(ps)).tolist() == ps
    assert s.keep_probability(_t(ps)).tolist() == [min(1.0, rate)] * len(ps)


# --- masks ---------------------------------------------------------------------------


def _py_mask(s: Sampler, seq_len: int, example_id: int, layer: int, kind: str) -> list[bool]:
    """The rule as the original tool evaluates it: float32 draw < float32(p_keep), one draw per position."""
    if s.name == "all":
        return [True] * seq_len
    draws = torch.rand(seq_len, generator=mask_generator(example_id, layer, kind)).tolist()
    if s.name == "uniform":
        p = min(1, s.base_rate / max(1, s.min_bucket_size))
        return [r < _f32(p) for r in draws]
    return [r < _f32(min(1, s.base_rate / 2 ** _py_log_bucket(i, s.min_bucket_size))) for i, r in enumerate(draws)]


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@settings(max_examples=40)
@given(
    samplers_st,
    st.floats(min_value=0.01, max_value=64),
    st.integers(min_value=1, max_value=16),
    st.integers(min_value=0, max_value=600),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=0, max_value=80),
    st.sampled_from(["q", "k"]),
)
def test_keep_mask_matches_python_rule(
    cls: type[Sampler], rate: float, size: int, seq_len: int, example_id: int, layer: int, kind: str
) -> None:
    s = cls(base_rate=rate, min_bucket_size=size)
    mask = keep_mask(s, seq_len, example_id, layer, kind)
    assert mask.dtype == torch.bool and mask.shape == (seq_len,)
    assert mask.tolist() == _py_mask(s, seq_len, example_id, layer, kind)
    assert torch.equal(mask, keep_mask(s, seq_len, example_id, layer, kind))  # deterministic
    idx = keep_indices(s, seq_len, example_id, layer, kind)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [i for i, keep in enumerate(mask.tolist()) if keep]


def test_keep_mask_pinned() -> None:
    # Regression pin of torch's CPU generator stream + our seeding; if this breaks,
    # new captures no longer line up with published datasets.
    assert keep_indices(UniformSampler(base_rate=0.25), 20, 5, 1, "q").tolist() == [3, 4, 7, 12, 13, 14, 17, 19]


def test_keep_mask_differs_across_inputs() -> None:
    s = UniformSampler(base_rate=0.5)
    base = keep_mask(s, 256, 11, 3, "q")
    assert not torch.equal(base, keep_mask(s, 256, 12, 3, "q"))
    assert not torch.equal(base, keep_mask(s, 256, 11, 4, "q"))
    assert not torch.equal(base, keep_mask(s, 256, 11, 3, "k"))


@pytest.mark.parametrize("cls", [UniformSampler, LogUniformSampler])
def test_keep_mask_prefix_stable(cls: type[Sampler]) -> None:
    s = cls(base_rate=0.3 if cls is UniformSampler else 8.0, min_bucket_size=2)
    long = keep_mask(s, 70_000, 42, 7, "k")
    for n in (0, 1, 15, 16, 17, 1000, 4096, 50_001):
        assert torch.equal(keep_mask(s, n, 42, 7, "k"), long[:n])


def test_all_keeps_everything_without_rng() -> None:
    s = AllSampler(base_rate=0.001, min_bucket_size=7)
    torch.manual_seed(0)
    a = keep_mask(s, 1000, 1, 2, "q")
    torch.manual_seed(1)
    b = keep_mask(s, 1000, 99, 5, "k")
    assert bool(a.all()) and bool(b.all())
    assert keep_mask(s, 0, 1, 2, "q").shape == (0,)
    # p_keep >= 1 everywhere keeps everything for any sampler.
    assert bool(keep_mask(UniformSampler(base_rate=3.0), 500, 1, 2, "q").all())


def test_uniform_empirical_rate() -> None:
    n = 100_000
    rate = keep_mask(UniformSampler(base_rate=0.25), n, 123, 0, "q").double().mean().item()
    assert abs(rate - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)  # 5 sigma ~ 0.0068


def test_log_uniform_expected_count_per_bucket() -> None:
    # base_rate positions per bucket in expectation, once buckets outgrow base_rate.
    s = LogUniformSampler(base_rate=16.0)
    mask = torch.zeros(2**16 - 1)
    for example_id in range(20):
        mask += keep_mask(s, 2**16 - 1, example_id, 0, "q")
    buckets = s.buckets(torch.arange(2**16 - 1))
    for b in range(8, 16):
        per_example = mask[buckets == b].sum().item() / 20
        assert abs(per_example - 16.0) < 5.0


# --- construction, description, registration -----------------------------------------


@pytest.mark.parametrize("cls", [UniformSampler, LogUniformSampler, AllSampler])
def test_validation(cls: type[Sampler]) -> None:
    for bad in (0, -1.0, math.nan, math.inf, "0.5", True):
        with pytest.raises(ValueError, match="base_rate"):
            cls(base_rate=bad, min_bucket_size=1)
    for bad in (0, -3, 1.5, "2", True):
        with pytest.raises(ValueError, match="min_bucket_size"):
            cls(base_rate=0.5, min_bucket_size=bad)
    with pytest.raises(ValueError, match="seq_len"):
        keep_mask(cls(base_rate=0.5, min_bucket_size=1), -1, 0, 0, "q")


def test_describe() -> None:
    d = LogUniformSampler(base_rate=8, min_bucket_size=4).describe()
    assert d["type"] == "log_uniform" and d["base_rate"] == 8 and d["min_bucket_size"] == 4
    assert "2**bucket" in d["p_keep"]
    assert UniformSampler(base_rate=0.1).describe()["type"] == "uniform"
    assert AllSampler(base_rate=1).describe()["type"] == "all"


def test_builtin_registration() -> None:
    pm = pluggy.PluginManager("qkcore")
    pm.add_hookspecs(hookspecs)
    pm.register(builtin)  # the core's own plugin registers the built-in samplers
    (registered,) = pm.hook.qkcore_samplers()
    assert registered == {"uniform": UniformSampler, "log_uniform": LogUniformSampler, "all": AllSampler}
    for name, factory in registered.items():
        s = factory(base_rate=0.5, min_bucket_size=2)
        assert isinstance(s, Sampler) and s.name == name


def test_keep_mask_compares_in_float32_like_the_original() -> None:
    """A draw equal to float32(p_keep) where p_keep rounds down is dropped, as `rand < p` does in torch."""
    base_rate = 0.7 * 128  # p_keep = 0.7 for min_bucket_size=128; float32(0.7) < 0.7
    sampler = UniformSampler(base_rate=base_rate, min_bucket_size=128)
    mask = keep_mask(sampler, 5000, 3, 1, "q")
    draws = torch.rand(5000, generator=mask_generator(3, 1, "q"), dtype=torch.float32)
    assert torch.equal(mask, draws < 0.7)  # torch's own float32 comparison with a Python float
