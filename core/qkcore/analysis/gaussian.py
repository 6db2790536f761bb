"""Closed-form attention plasticity of key pairs under a Gaussian query model.

For a query bucket the queries are modelled as ``q ~ N(mu, Sigma)``. For a key
pair ``(k1, k2)`` with ``w = k1 - k2`` the score difference ``q.w`` is Gaussian
with mean ``w.mu`` and variance ``w' Sigma w``, so the probability that the
query prefers ``k1`` is ``p = Phi(w.mu / sqrt(w' Sigma w))``. Attention
plasticity ``AP = 4 p (1 - p)`` is 1 when the preference is a coin flip (the
query content decides) and 0 when it is fixed (position decides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "QueryModel",
    "attention_plasticity",
    "fit_query_model",
    "normal_cdf",
    "pair_plasticity",
    "pair_win_probability",
]

F64 = NDArray[np.float64]

#: Relative size below which a variance ``w' Sigma w`` counts as zero.
ZERO_VARIANCE_RTOL = 1e-12
#: Smallest shrinkage intensity used once a covariance needs shrinking.
MIN_SHRINKAGE = 1e-6
#: Smallest eigenvalue (relative to ``tr(S)/d``) of a covariance kept unshrunk.
SINGULAR_RTOL = 1e-10

# Vectorised erfc: exact in the tails, unlike 0.5 * (1 + erf(x)), and keeps the
# analysis free of a torch import in every worker process.
_erfc = np.frompyfunc(math.erfc, 1, 1)


def normal_cdf(x: F64) -> F64:
    """Standard normal CDF ``Phi(x)``, elementwise, in float64."""
    x = np.asarray(x, dtype=np.float64)
    return (0.5 * _erfc(-x / math.sqrt(2.0))).astype(np.float64)


@dataclass(frozen=True)
class QueryModel:
    """Gaussian model of one bucket's queries.

    ``shrinkage`` is the Ledoit-Wolf intensity applied to the covariance (0 when
    the sample covariance was used unchanged).
    """

    mean: F64
    cov: F64
    n: int
    shrinkage: float


def fit_query_model(queries: NDArray[np.floating]) -> QueryModel:
    """Fit ``N(mu, Sigma)`` to ``queries`` (``n x d``, ``n >= 2``).

    ``mu`` is the sample mean. ``Sigma`` is the unbiased sample covariance when
    it is non-singular (``n > d`` and smallest eigenvalue above
    ``SINGULAR_RTOL * tr(S)/d``). Otherwise it is shrunk towards the scaled
    identity with the Ledoit-Wolf (2004) intensity ``delta`` computed from the
    biased covariance ``S``: ``Sigma = (1 - delta) S + delta (tr(S)/d) I``, with
    ``delta`` floored at ``MIN_SHRINKAGE`` so the result is always positive
    definite. An all-zero covariance (identical queries) is kept as is; the
    plasticity then follows the sign of ``w.mu``.
    """
    q = np.asarray(queries, dtype=np.float64)
    n, d = q.shape
    if n < 2:
        raise ValueError(f"need at least 2 queries to fit a covariance, got {n}")
    mean = q.mean(axis=0)
    x = q - mean
    cov = x.T @ x / (n - 1)
    scale = float(np.trace(cov)) / d
    if scale <= 0.0:
        return QueryModel(mean, cov, n, 0.0)
    if n > d and float(np.linalg.eigvalsh(cov)[0]) > SINGULAR_RTOL * scale:
        return QueryModel(mean, cov, n, 0.0)
    delta = max(_ledoit_wolf_intensity(x), MIN_SHRINKAGE)
    s = x.T @ x / n
    mu = float(np.trace(s)) / d
    shrunk = (1.0 - delta) * s + delta * mu * np.eye(d)
    return QueryModel(mean, shrunk, n, delta)


def _ledoit_wolf_intensity(x: F64) -> float:
    """Ledoit-Wolf shrinkage intensity for centred samples ``x`` (``n x d``).

    ``sum_k ||x_k x_k' - S||_F^2`` is computed as
    ``sum_k ||x_k||^4 - n ||S||_F^2`` so no ``d x d`` matrix per sample is formed.
    """
    n, d = x.shape
    s = x.T @ x / n
    mu = float(np.trace(s)) / d
    d2 = float(np.sum((s - mu * np.eye(d)) ** 2))
    if d2 <= 0.0:
        return 0.0
    sq_norms = np.einsum("ij,ij->i", x, x)
    b2_bar = (float(np.sum(sq_norms**2)) - n * float(np.sum(s**2))) / n**2
    return min(max(b2_bar, 0.0), d2) / d2


def pair_win_probability(diffs: NDArray[np.floating], mean: F64, cov: F64) -> F64:
    """``P(q.w > 0)`` for each row ``w`` of ``diffs`` (``N x d``), ``q ~ N(mean, cov)``.

    Batched as ``m = W mu`` and ``v = rowsum((W Sigma) * W)`` so no ``N x N``
    matrix is formed; each row is first divided by its largest absolute entry
    (``p`` does not depend on the scale of ``w``). Where ``v`` is zero (relative to ``||w||^2 tr(Sigma)/d``)
    ``p`` is 1, 0 or 1/2 by the sign of ``m``.
    """
    w = np.asarray(diffs, dtype=np.float64)
    # p is invariant to each row's scale; dividing by the row's max |entry|
    # (exact, unlike a norm) keeps m and v clear of underflow/overflow.
    peak = np.max(np.abs(w), axis=1, keepdims=True) if w.size else np.ones((w.shape[0], 1))
    w = w / np.where(peak > 0.0, peak, 1.0)
    mean = np.asarray(mean, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    m = w @ mean
    v = np.einsum("ij,ij->i", w @ cov, w)
    # Relative threshold keeps the zero-variance branch invariant to key scale.
    floor = ZERO_VARIANCE_RTOL * np.einsum("ij,ij->i", w, w) * max(np.trace(cov) / len(mean), 0.0)
    degenerate = v <= floor
    z = np.divide(m, np.sqrt(np.where(degenerate, 1.0, v)))
    p = normal_cdf(np.where(degenerate, 0.0, z))
    sign = np.sign(m)
    return np.where(degenerate, 0.5 * (1.0 + sign), p)


def attention_plasticity(p: NDArray[np.floating]) -> F64:
    """``AP = 4 p (1 - p)``: 1 for a coin-flip preference, 0 for a fixed one."""
    p = np.asarray(p, dtype=np.float64)
    return 4.0 * p * (1.0 - p)


def pair_plasticity(k1: NDArray[np.floating], k2: NDArray[np.floating], mean: F64, cov: F64) -> F64:
    """Attention plasticity of each key pair (rows of ``k1``/``k2``) for ``q ~ N(mean, cov)``."""
    diffs = np.asarray(k1, dtype=np.float64) - np.asarray(k2, dtype=np.float64)
    return attention_plasticity(pair_win_probability(diffs, mean, cov))
