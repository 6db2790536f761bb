"""Shared offline fixtures: tiny architecture configs, a small corpus, config writing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# The CI machine is shared and noisy: a 200 ms deadline once failed at 377 ms under load.
# No per-example deadline for the whole suite (tests that set their own keep it).
settings.register_profile("qkcore", deadline=None)
settings.load_profile("qkcore")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# After the offline switches: importing the kit imports transformers and huggingface_hub.
# The kit is also this suite's pytest plugin (its fixtures: qk_eager_reference, qk_sniff, ...).
from qkcore.testing import TEXTS, TINY_LLAMA, write_corpus, write_run_config  # noqa: E402,F401 (shared by the tests)

pytest_plugins = ["qkcore.testing"]

REPO = Path(__file__).resolve().parents[1]


def make_config(tmp_path: Path, architecture: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
    """Write a run config into ``tmp_path`` and return its path; ``sections`` update the defaults."""
    return write_run_config(tmp_path, architecture or TINY_LLAMA, **sections)


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Factory: ``tiny_config(**sections)`` -> path of a config for a tiny random Llama."""

    def factory(architecture: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
        return make_config(tmp_path, architecture, **sections)

    return factory
