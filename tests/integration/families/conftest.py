"""Fixtures for the per-family tests."""

from __future__ import annotations

import pytest

from qkcore.testing import single_torch_thread


@pytest.fixture(autouse=True, scope="package")
def _single_torch_thread():
    """Run the tiny models on one intra-op thread (see :func:`qkcore.testing.single_torch_thread`)."""
    with single_torch_thread():
        yield
