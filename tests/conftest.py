"""Shared offline fixtures: tiny architecture configs, a small corpus, config writing."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings

# The CI machine is shared and noisy: a 200 ms deadline once failed at 377 ms under load.
# No per-example deadline for the whole suite (tests that set their own keep it).
settings.register_profile("qkcore", deadline=None)
settings.load_profile("qkcore")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

#: A real LlamaConfig, shrunk: GQA 4 query heads per key head, vocab for the byte tokenizer.
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 259,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "pad_token_id": 256,
}

TEXTS = [
    ("doc-a", "Stakes drilled into the glacier show how much ice melted over the summer."),
    ("doc-b", "The harbour master keeps a log of every vessel that enters after dusk, with lantern counts."),
    (12, "Flour arrives on Tuesdays."),
    ("doc-d", "A relay station forwards messages it cannot read; it checks only the envelope and the hop counter."),
    (99, "Readers in the archive use pencils only, and every box is returned before the next is issued."),
]


def write_corpus(path: Path, texts: list[tuple[Any, str]] = TEXTS) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for example_id, text in texts:
            handle.write(json.dumps({"id": example_id, "text": text}) + "\n")
    return path


def make_config(tmp_path: Path, architecture: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
    """Write a run config into ``tmp_path`` and return its path; ``sections`` update the defaults."""
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    config: dict[str, Any] = {
        "dataset": {"path": str(corpus), "text_column": "text", "id_column": "id"},
        "model": {"name": "test/tiny", "config": architecture or TINY_LLAMA, "dtype": "float32", "device_map": "cpu"},
        "tokenizer": {"name": "qkcore:bytes", "max_length": 512},
        "inference": {"batch_size": 2},
        "capture": {"sampler": {"type": "all"}, "min_bucket_size": 16},
        "output": {"data_root": str(tmp_path / "out")},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tmp_path: Path):
    """Factory: ``tiny_config(**sections)`` -> path of a config for a tiny random Llama."""

    def factory(architecture: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Path:
        return make_config(tmp_path, architecture, **sections)

    return factory
