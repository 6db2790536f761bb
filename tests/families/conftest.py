"""Fixtures for the per-family tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_torch_thread():
    """Run the tiny models on one intra-op thread (restored afterwards).

    Their matrices are a few dozen wide, so threads buy nothing; on a busy CI
    machine OpenMP workers spin-waiting for a core made these files 3x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
