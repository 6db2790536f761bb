"""Shared helpers for the per-family tests: tiny real configs, runs, the eager reference.

Every family test builds a tiny model from the family's *real* config class
(``AutoConfig.for_model(model_type, **sizes)``), captures it with the byte
tokenizer and compares the written rows with the same random model run in
eager mode (``tests.oracle.assert_rows_match_eager``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from qkcore.config import load_config
from qkcore.layers import AttentionLayer
from qkcore.plugins import Family
from qkcore.sniff import SniffResult, run_sniff
from tests.conftest import make_config
from tests.families._eager_reference import eager_reference
from tests.oracle import assert_rows_match_eager, read_rows

#: Sizes shared by the tiny family configs: GQA 8 query heads over 2 key heads.
SIZES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 259,  # the byte tokenizer's vocabulary
    "max_position_embeddings": 2048,
    "pad_token_id": 256,  # the byte tokenizer's <pad>, <bos>, <eos>
    "bos_token_id": 257,
    "eos_token_id": 258,
}

_run_ids = itertools.count()


def tiny(model_type: str, **overrides: Any) -> dict[str, Any]:
    """An inline architecture dict for ``model_type`` with the shared tiny sizes."""
    return {"model_type": model_type, **SIZES, **overrides}


def sniff(tmp_path: Path, architecture: dict[str, Any], **sections: Any) -> SniffResult:
    """Capture ``architecture`` into a fresh folder under ``tmp_path`` (sampler ``all`` unless overridden)."""
    run_dir = tmp_path / f"run{next(_run_ids)}"
    run_dir.mkdir()
    model = {"config": architecture, **sections.pop("model", {})}
    return run_sniff(load_config(make_config(run_dir, model=model, **sections)))


@dataclass
class Reference:
    """The tiny model in eager mode, its layers (from its plugin) and per-document attentions."""

    model: torch.nn.Module
    family: Family
    layers: list[AttentionLayer]
    attentions: dict[Any, list[torch.Tensor]]
    inputs: dict[Any, torch.Tensor]

    def layer(self, index: int) -> AttentionLayer:
        return next(layer for layer in self.layers if layer.index == index)

    def check(self, root: Path, **kwargs: Any) -> int:
        """Run the oracle on every query config under ``root``; return the heads checked."""
        q_per_k = self.layers[0].num_query_heads // self.layers[0].num_key_value_heads
        return assert_rows_match_eager(
            root,
            self.attentions,
            scaling=lambda index: float(self.layer(index).module.scaling),
            key_head=lambda q: q // q_per_k,
            **kwargs,
        )


def reference(tmp_path: Path, architecture: dict[str, Any], **model_section: Any) -> Reference:
    """Build the same random model a run builds (same seed and class), in eager mode."""
    run_dir = tmp_path / f"ref{next(_run_ids)}"
    run_dir.mkdir()
    ref = eager_reference(run_dir, architecture, **model_section)
    layers = ref.family.hooks.qkcore_attention_layers(model=ref.model)
    return Reference(ref.model, ref.family, layers, ref.attentions, ref.inputs)


def rows(root: Path, layer: int, head: int, kind: str, example_id: Any) -> np.ndarray:
    """The vectors of one example in ``lXXhYY{kind}``, ordered by position."""
    _, vectors, _ = read_rows(root, f"l{layer:02d}h{head:02d}{kind}", example_id)
    return vectors


def sliding_column(root: Path, config: str) -> set[Any]:
    """The distinct values of a config's ``sliding_window`` column."""
    return set(pq.read_table(Path(root) / config / "data.parquet").column("sliding_window").to_pylist())


def rope_tables(model: torch.nn.Module, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own cos/sin for positions ``0..length-1``."""
    return model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])


def capture_all(**capture: Any) -> dict[str, Any]:
    """A ``capture`` section keeping every position of every head (plus ``capture``)."""
    return {"sampler": {"type": "all"}, "head_sampling": None, **capture}
