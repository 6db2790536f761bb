"""Position samplers: which token positions of a sequence get captured.

A sampler assigns every position a bucket and a keep probability ``p_keep``;
:func:`keep_mask` draws one Bernoulli mask per (example, layer, kind) from a
generator seeded by :func:`qkcore.seeding.mask_seed`. All rules reproduce the
original capture tool exactly, so new captures line up with published datasets.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from qkcore.config import check_base_rate, check_min_bucket_size
from qkcore.seeding import mask_generator, subsample_seed

_INT64_MAX = 2**63 - 1


def _check_positions(positions: torch.Tensor) -> torch.Tensor:
    """Return ``positions`` as int64, rejecting float dtypes and negative values."""
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
    positions = positions.to(torch.int64)
    if positions.numel() and bool((positions < 0).any()):
        raise ValueError("positions must be non-negative")
    return positions


def floor_log2_plus_one(positions: torch.Tensor) -> torch.Tensor:
    """Exact ``floor(log2(p + 1))`` for a non-negative int64 tensor (int64 result).

    Integer bit-length by binary search over shifts; float log2 would be wrong
    near powers of two once ``p + 1`` exceeds 2**53.
    """
    positions = _check_positions(positions)
    at_max = positions == _INT64_MAX
    # p + 1 would overflow at the int64 maximum, whose answer is 63 anyway.
    value = torch.where(at_max, torch.zeros_like(positions), positions) + 1
    result = torch.zeros_like(positions)
    for shift in (32, 16, 8, 4, 2, 1):
        shifted = value >> shift
        high = shifted > 0
        result += high * shift
        value = torch.where(high, shifted, value)
    return torch.where(at_max, torch.full_like(positions, 63), result)


class Sampler(abc.ABC):
    """Base class of position samplers.

    ``base_rate`` (> 0) scales the keep probability; ``min_bucket_size`` (an
    integer >= 1) is the smallest bucket width.
    """

    name: ClassVar[str] = "sampler"
    base_rate: float
    min_bucket_size: int

    def __init__(self, *, base_rate: float, min_bucket_size: int = 1) -> None:
        # The config's rules, also for samplers built directly.
        for name, value, check in (("base_rate", base_rate, check_base_rate),
                                   ("min_bucket_size", min_bucket_size, check_min_bucket_size)):
            try:
                check(value)
            except ValueError as exc:
                raise ValueError(f"{name} {exc}, got {value!r}") from None
        self.base_rate = base_rate
        self.min_bucket_size = check_min_bucket_size(min_bucket_size)

    @abc.abstractmethod
    def buckets(self, positions: torch.Tensor) -> torch.Tensor:
        """Return the int64 bucket of each position."""

    @abc.abstractmethod
    def keep_probability(self, positions: torch.Tensor) -> torch.Tensor:
        """Return the float64 keep probability (in [0, 1]) of each position."""

    @abc.abstractmethod
    def p_keep_rule(self) -> str:
        """Describe the keep-probability rule in words (for the dataset card)."""

    def describe(self) -> dict[str, Any]:
        """Return the sampler's settings and rule for the dataset card."""
        return {
            "type": self.name,
            "base_rate": self.base_rate,
            "min_bucket_size": self.min_bucket_size,
            "p_keep": self.p_keep_rule(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_rate={self.base_rate!r}, min_bucket_size={self.min_bucket_size!r})"


#: A sampler constructor, called as ``factory(base_rate=..., min_bucket_size=...)``.
SamplerFactory = Callable[..., Sampler]


class _FixedWidthSampler(Sampler):
    """Shared base of samplers with fixed-width buckets and one constant ``p_keep``."""

    @abc.abstractmethod
    def _p_keep(self) -> float:
        """The constant keep probability."""

    def buckets(self, positions: torch.Tensor) -> torch.Tensor:
        """``floor(p / min_bucket_size)``."""
        positions = _check_positions(positions)
        return torch.div(positions, self.min_bucket_size, rounding_mode="floor")

    def keep_probability(self, positions: torch.Tensor) -> torch.Tensor:
        """The constant ``p_keep`` for every position."""
        positions = _check_positions(positions)
        return torch.full(positions.shape, self._p_keep(), dtype=torch.float64, device=positions.device)


class UniformSampler(_FixedWidthSampler):
    """Same keep probability everywhere; buckets are fixed-width runs of positions."""

    name: ClassVar[str] = "uniform"

    def _p_keep(self) -> float:
        # Plain Python float maths, identical to the original tool's rule.
        return float(min(1, self.base_rate / max(1, self.min_bucket_size)))

    def p_keep_rule(self) -> str:
        return "p_keep = min(1, base_rate / max(1, min_bucket_size)) at every position"


class AllSampler(_FixedWidthSampler):
    """Keep every position (``min_bucket_size`` only sets the buckets)."""

    name: ClassVar[str] = "all"

    def _p_keep(self) -> float:
        return 1.0

    def p_keep_rule(self) -> str:
        return "p_keep = 1 (every position is kept)"


class LogUniformSampler(Sampler):
    """Log-spaced buckets with equal expected kept count per bucket.

    Bucket ``b`` covers positions ``2**b - 1 .. 2**(b+1) - 2``; buckets below
    ``ceil(log2(min_bucket_size))`` are merged into that one.
    """

    name: ClassVar[str] = "log_uniform"

    @property
    def min_bucket(self) -> int:
        """``ceil(log2(min_bucket_size))``, exactly (0 for a size of 1)."""
        return (self.min_bucket_size - 1).bit_length()

    def buckets(self, positions: torch.Tensor) -> torch.Tensor:
        """``max(floor(log2(p + 1)), ceil(log2(min_bucket_size)))``."""
        return torch.clamp(floor_log2_plus_one(positions), min=self.min_bucket)

    def keep_probability(self, positions: torch.Tensor) -> torch.Tensor:
        """``min(1, base_rate / 2**bucket)``."""
        buckets = self.buckets(positions)
        # Buckets lie in [m, max(m, 63)], so look the value up in a table computed
        # with the plain-Python rule: bit-identical to it by construction.
        lowest = self.min_bucket
        highest = max(lowest, 63)
        table = torch.tensor(
            [float(min(1, self.base_rate / 2**b)) for b in range(lowest, highest + 1)],
            dtype=torch.float64,
            device=buckets.device,
        )
        return table[buckets - lowest]

    def p_keep_rule(self) -> str:
        return (
            "p_keep = min(1, base_rate / 2**bucket), bucket = max(floor(log2(p + 1)), "
            "ceil(log2(min_bucket_size)))"
        )

    def describe(self) -> dict[str, Any]:
        """The settings, plus the smallest bucket actually used: the power of two at or above ``min_bucket_size``."""
        return {**super().describe(), "effective_min_bucket_size": 2**self.min_bucket}


def keep_mask(sampler: Sampler, seq_len: int, example_id: int, layer: int, kind: str) -> torch.Tensor:
    """Return the bool mask (shape ``(seq_len,)``) of positions ``0..seq_len-1`` to keep.

    One mask per (example, layer, kind) is shared by every head of that layer.
    """
    threshold = _thresholds(sampler, seq_len)
    if threshold is None:
        # rand < 1 always holds; skip the draw so the mask cannot depend on the RNG.
        return torch.ones(seq_len, dtype=torch.bool)
    # The original tool compares `torch.rand(seq_len, generator=g) < p_keep` in float32
    # (a float32 tensor against a Python float or float32 tensor compares in float32).
    # We do the same, so a draw equal to float32(p_keep) is dropped exactly as there;
    # comparing in float64 would keep it whenever p_keep rounds down in float32.
    draws = torch.rand(seq_len, generator=mask_generator(example_id, layer, kind), dtype=torch.float32)
    return draws < threshold


_THRESHOLD_CACHE_SIZE = 8


def _thresholds(sampler: Sampler, seq_len: int) -> torch.Tensor | None:
    """float32 p_keep of positions ``0..seq_len-1`` (``None`` when all are 1), checked once per length.

    It depends on the length alone, while a batch asks for it once per (example,
    layer, kind): cached per sampler for the few most recent lengths.
    """
    cache: dict[int, torch.Tensor | None] = sampler.__dict__.setdefault("_qkcore_thresholds", {})
    if seq_len in cache:
        return cache[seq_len]
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    positions = torch.arange(seq_len, dtype=torch.int64)
    p_keep = sampler.keep_probability(positions).to(torch.float64)
    if p_keep.shape != positions.shape:
        raise ValueError(f"{sampler!r}.keep_probability returned shape {tuple(p_keep.shape)}, expected ({seq_len},)")
    if seq_len and not bool(((p_keep >= 0) & (p_keep <= 1)).all()):
        raise ValueError(f"{sampler!r}.keep_probability returned values outside [0, 1]")
    threshold = None if bool((p_keep >= 1).all()) else p_keep.to(torch.float32)
    if len(cache) >= _THRESHOLD_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[seq_len] = threshold
    return threshold


def keep_indices(sampler: Sampler, seq_len: int, example_id: int, layer: int, kind: str) -> torch.Tensor:
    """Return the kept positions (int64, ascending) of :func:`keep_mask`."""
    return keep_mask(sampler, seq_len, example_id, layer, kind).nonzero().squeeze(1).to(torch.int64)


def cap_rows(kept: torch.Tensor, limit: int | None, example_id: int, layer: int, kind: str, first_head: int) -> torch.Tensor:
    """At most ``limit`` of a document's ``kept`` positions (``capture.max_rows_per_batch``), as sniff-qk picks them.

    Over the limit, ``torch.randperm(len(kept))`` from a generator seeded with
    :func:`qkcore.seeding.subsample_seed` orders the positions and the first ``limit`` stay
    (in that order; the writer sorts rows anyway). The same mask is shared by every head.
    """
    if limit is None or limit <= 0 or kept.numel() <= limit:
        return kept
    generator = torch.Generator()
    generator.manual_seed(subsample_seed(example_id, layer, first_head, kind))
    return kept[torch.randperm(kept.numel(), generator=generator)[:limit]]

