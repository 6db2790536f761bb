"""Closed-form attention plasticity vs Monte Carlo, and its invariances."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qkcore.analysis.gaussian import (
    attention_plasticity,
    fit_query_model,
    normal_cdf,
    pair_plasticity,
    pair_win_probability,
)

N_SAMPLES = 400_000
Z = 4.5  # per-pair two-sided bound; with 24 pairs a false failure is ~1e-4


def test_closed_form_matches_monte_carlo(record_property: pytest.RecordProperty) -> None:
    """Sampling q ~ N(mu, Sigma) and counting q.k1 > q.k2 reproduces p and AP."""
    rng = np.random.default_rng(1234)
    d, n_pairs = 6, 24
    mu = rng.normal(size=d)
    a = rng.normal(size=(d, d))
    sigma = a @ a.T / d + 0.1 * np.eye(d)
    k1 = rng.normal(size=(n_pairs, d))
    # Mix near (high-AP) and far (low-AP) pairs so both regimes are checked.
    k2 = k1 + rng.normal(size=(n_pairs, d)) * rng.choice([0.05, 1.0, 3.0], size=(n_pairs, 1))

    p = pair_win_probability(k1 - k2, mu, sigma)
    ap = attention_plasticity(p)
    q = rng.multivariate_normal(mu, sigma, size=N_SAMPLES)
    p_hat = ((q @ k1.T) > (q @ k2.T)).mean(axis=0)
    ap_hat = 4 * p_hat * (1 - p_hat)

    # Exact AP error bound from a p error delta: |dAP| = 4 |dp| |1 - p - p_hat|.
    delta = Z * np.sqrt(np.maximum(p * (1 - p), 1e-12) / N_SAMPLES) + 1.0 / N_SAMPLES
    ap_bound = 4 * delta * (np.abs(1 - 2 * p) + delta)
    max_p_diff = float(np.max(np.abs(p_hat - p)))
    max_ap_diff = float(np.max(np.abs(ap_hat - ap)))
    mean_diff = abs(float(ap.mean() - ap_hat.mean()))
    figure = (
        f"Monte Carlo ({N_SAMPLES} queries, {n_pairs} pairs): max|p-p_hat|={max_p_diff:.2e}, "
        f"max|AP-AP_hat|={max_ap_diff:.2e}, |mean AP diff|={mean_diff:.2e}, AP range [{ap.min():.3f}, {ap.max():.3f}]"
    )
    print(figure)
    record_property("monte_carlo_agreement", figure)
    assert np.all(np.abs(p_hat - p) <= delta), figure
    assert np.all(np.abs(ap_hat - ap) <= ap_bound), figure
    assert ap.min() < 0.5 < ap.max(), figure  # both regimes exercised


def test_normal_cdf_values() -> None:
    x = np.array([-40.0, -1.959963984540054, 0.0, 1.0, 40.0])
    got = normal_cdf(x)
    assert got[0] == pytest.approx(0.0, abs=1e-300)
    assert got[1] == pytest.approx(0.025, rel=1e-12)
    assert got[2] == 0.5
    assert got[3] == pytest.approx(0.8413447460685429, rel=1e-14)
    assert got[4] == 1.0


def test_zero_variance_branches() -> None:
    mu = np.array([1.0, 0.0])
    w = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    p = pair_win_probability(w, mu, np.zeros((2, 2)))
    assert p.tolist() == [1.0, 0.0, 0.5, 0.5]


def test_fit_query_model_shrinks_only_when_singular() -> None:
    rng = np.random.default_rng(0)
    many = rng.normal(size=(500, 4))
    model = fit_query_model(many)
    assert model.shrinkage == 0.0
    np.testing.assert_allclose(model.cov, np.cov(many, rowvar=False))
    few = rng.normal(size=(3, 8))  # n <= d: rank-deficient sample covariance
    shrunk = fit_query_model(few)
    assert 0.0 < shrunk.shrinkage <= 1.0
    assert np.linalg.eigvalsh(shrunk.cov)[0] > 0.0
    same = fit_query_model(np.ones((5, 3)))
    assert np.all(same.cov == 0.0)


# Hypothesis strategies: small dimensions, bounded finite values.
_finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=64)


@st.composite
def _problems(draw: st.DrawFn, pd: bool = False) -> tuple[np.ndarray, ...]:
    d = draw(st.integers(1, 6))
    n = draw(st.integers(1, 8))
    mu = draw(arrays(np.float64, d, elements=_finite))
    a = draw(arrays(np.float64, (d, d), elements=_finite))
    sigma = a @ a.T + (0.1 * np.eye(d) if pd else 0.0)
    k1 = draw(arrays(np.float64, (n, d), elements=_finite))
    k2 = draw(arrays(np.float64, (n, d), elements=_finite))
    return mu, sigma, k1, k2


@settings(max_examples=200, deadline=None)
@given(_problems())
def test_ap_in_unit_interval(problem: tuple[np.ndarray, ...]) -> None:
    mu, sigma, k1, k2 = problem
    ap = pair_plasticity(k1, k2, mu, sigma)
    assert np.all((ap >= 0.0) & (ap <= 1.0))


@settings(max_examples=200, deadline=None)
@given(_problems())
def test_swapping_keys_leaves_ap_unchanged(problem: tuple[np.ndarray, ...]) -> None:
    mu, sigma, k1, k2 = problem
    np.testing.assert_allclose(pair_plasticity(k1, k2, mu, sigma), pair_plasticity(k2, k1, mu, sigma), rtol=0, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(_problems(pd=True), st.floats(0.01, 100.0))
def test_scaling_keys_leaves_ap_unchanged(problem: tuple[np.ndarray, ...], scale: float) -> None:
    mu, sigma, k1, k2 = problem
    np.testing.assert_allclose(
        pair_plasticity(scale * k1, scale * k2, mu, sigma), pair_plasticity(k1, k2, mu, sigma), rtol=0, atol=1e-9
    )


@settings(max_examples=200, deadline=None)
@given(_problems())
def test_zero_covariance_gives_zero_ap_for_distinct_scores(problem: tuple[np.ndarray, ...]) -> None:
    mu, _, k1, k2 = problem
    ap = pair_plasticity(k1, k2, mu, np.zeros((mu.size, mu.size)))
    # Scores clearly apart, so rounding cannot make them tie.
    distinct = np.abs(k1 @ mu - k2 @ mu) > 1e-6
    assert np.all(ap[distinct] == 0.0)
