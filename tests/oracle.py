"""Reusable correctness oracle for any family (see tests/test_oracle.py for the Llama use).

``assert_rows_match_eager(...)`` recomputes softmax(q·kᵀ·scale [softcapped] + causal
[+ sliding window]) from the written rows of every captured query head and compares
it with the probabilities the model itself returns in eager mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq
import torch

from qkcore.example_ids import normalize_example_id, to_int32
from qkcore.layout import parse_config_name


def read_rows(root: Path, config: str, example_id: Any) -> tuple[np.ndarray, np.ndarray, list]:
    """Positions (sorted), vectors and sliding_window values of one example in one config."""
    table = pq.read_table(Path(root) / config / "data.parquet").to_pydict()
    wanted = to_int32(normalize_example_id(example_id))
    keep = [i for i, e in enumerate(table["example_id"]) if e == wanted]
    positions = np.array([table["position"][i] for i in keep], dtype=np.int64)
    vectors = np.array([table["vector"][i] for i in keep], dtype=np.float32).reshape(len(keep), -1)
    windows = [table["sliding_window"][i] for i in keep]
    order = np.argsort(positions, kind="stable")
    return positions[order], vectors[order], [windows[i] for i in order]


def eager_attentions(backbone: torch.nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer attention probabilities (heads, seq, seq) of one document, eager attention."""
    with torch.no_grad():
        out = backbone(input_ids=input_ids, use_cache=False, output_attentions=True)
    return [a[0] for a in out.attentions]


def assert_rows_match_eager(
    root: Path,
    attentions: dict[Any, list[torch.Tensor]],
    *,
    scaling: Callable[[int], float],
    key_head: Callable[[int], int],
    softcap: float | None = None,
    query_transform: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    attention_index: Callable[[int], int] = lambda layer: layer,
    atol: float = 2e-6,
) -> int:
    """Check every ``lXXhYYq`` config under ``root``; return the number of heads checked.

    ``attentions[example_id][i]`` are the eager probabilities of attention call ``i``
    (``attention_index`` maps a decoder layer index to it, e.g. skipping cross layers).
    ``query_transform(layer, q, positions)`` re-applies what the family does to the
    query after the captured stage (e.g. a position-dependent scale).
    """
    checked = 0
    for config_dir in sorted(Path(root).iterdir()):
        parsed = parse_config_name(config_dir.name)
        if parsed is None or parsed[2] != "q":
            continue
        layer, q_head, _ = parsed
        for example_id, per_layer in attentions.items():
            expected = per_layer[attention_index(layer)][q_head]
            positions, q, windows = read_rows(root, config_dir.name, example_id)
            k_positions, k, _ = read_rows(root, f"l{layer:02d}h{key_head(q_head):02d}k", example_id)
            length = expected.shape[-1]
            assert positions.tolist() == list(range(length)) == k_positions.tolist(), config_dir.name
            q_t = torch.from_numpy(q)
            if query_transform is not None:
                q_t = query_transform(layer, q_t, torch.from_numpy(positions))
            scores = q_t @ torch.from_numpy(k).T * scaling(layer)
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            i = torch.arange(length)[:, None]
            j = torch.arange(length)[None, :]
            allowed = j <= i
            window = windows[0] if windows else None
            if window is not None:
                allowed &= (i - j) < window
            scores = scores.masked_fill(~allowed, float("-inf"))
            torch.testing.assert_close(
                torch.softmax(scores, dim=-1), expected, atol=atol, rtol=1e-5,
                msg=lambda m: f"{config_dir.name} example {example_id}: {m}",
            )
            checked += 1
    return checked
