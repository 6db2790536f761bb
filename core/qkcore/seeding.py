"""Deterministic per-(example, layer, kind) seeds for the position masks.

The constants and the mixing order reproduce the original capture tool exactly,
so masks (and therefore which positions are published) line up across runs,
machines and versions.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_SEED_INIT = 0x243F6A8885A308D3  # fractional digits of pi
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio


def mix64(x: int) -> int:
    """SplitMix64 finalizer; the input is taken mod 2**64, the result is in [0, 2**64)."""
    x &= _MASK64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x


def mask_seed(example_id: int, layer: int, kind: str) -> int:
    """Return the 64-bit seed of the mask for ``(example_id, layer, kind)``.

    Only ``kind[0]`` matters (``"q"``/``"k"``); ``example_id`` may be negative and
    is taken mod 2**64.
    """
    if not kind:
        raise ValueError("kind must be a non-empty string such as 'q' or 'k'")
    seed = _SEED_INIT
    for value in (mix64(example_id & _MASK64), mix64(layer), mix64(ord(kind[0]) & 0xFF)):
        seed ^= value
        seed = (seed * _GOLDEN) & _MASK64
        seed ^= seed >> 32
    return seed


def mask_generator(example_id: int, layer: int, kind: str) -> torch.Generator:
    """Return a fresh CPU generator seeded with :func:`mask_seed`.

    A fresh generator per mask keeps each mask independent of capture order,
    batching and device.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(mask_seed(example_id, layer, kind))
    return generator


def subsample_seed(example_id: int, layer: int, head: int, kind: str) -> int:
    """Seed of the permutation that caps a document's rows (``capture.max_rows_per_batch``), as sniff-qk builds it.

    ``head`` is the first (smallest) captured head of the (layer, kind); the bits are
    laid out ``layer | head << 16 | kind << 32 | low 32 bits of the id << 40``, mod 2**64.
    """
    seed = (layer & 0xFFFF) ^ ((head & 0xFFFF) << 16) ^ ((ord(kind[0]) & 0xFF) << 32) ^ ((example_id & 0xFFFFFFFF) << 40)
    return seed & _MASK64
