"""Qwen2: biased q/k projections and sliding-window layers (``use_sliding_window``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from qkcore.testing import (
    TEXTS,
    capture_all,
    rope_tables,
    rows,
    sliding_window_values,
    sniff,
    tiny_architecture,
)

WINDOW = 16  # shorter than most test documents, so the window changes the attention
#: Default layer_types: layers from max_window_layers on slide -> layer 0 full, layer 1 sliding.
ARCH = tiny_architecture("qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
#: Explicit layer_types, the other way round.
ARCH_LAYER_TYPES = tiny_architecture(
    "qwen2", use_sliding_window=True, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]
)


def test_layers_describe_kinds_windows_and_biased_projections(qk_eager_reference) -> None:
    ref = qk_eager_reference(ARCH)
    assert [(layer.kind, layer.sliding_window) for layer in ref.layers] == [("full", None), ("sliding", WINDOW)]
    assert {(layer.num_query_heads, layer.num_key_value_heads, layer.head_dim) for layer in ref.layers} == {(8, 2, 16)}
    assert all(layer.module.q_proj.bias is not None and layer.module.k_proj.bias is not None for layer in ref.layers)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_rows_reproduce_eager_attention_with_sliding_layers(qk_eager_reference, qk_sniff, attn_implementation) -> None:
    result = qk_sniff(ARCH, model={"attn_implementation": attn_implementation}, capture=capture_all())
    assert qk_eager_reference(ARCH).check(result.data_root) == 2 * 8 * len(TEXTS)
    assert sliding_window_values(result.data_root, "l00h03q") == {None}
    assert (
        sliding_window_values(result.data_root, "l01h03q") == sliding_window_values(result.data_root, "l01h01k") == {WINDOW}
    )


def test_explicit_layer_types_are_honoured(qk_eager_reference, qk_sniff) -> None:
    explicit = qk_eager_reference(ARCH_LAYER_TYPES)
    assert [layer.kind for layer in explicit.layers] == ["sliding", "full"]
    result = qk_sniff(ARCH_LAYER_TYPES, capture=capture_all())
    assert explicit.check(result.data_root) == 2 * 8 * len(TEXTS)
    assert sliding_window_values(result.data_root, "l00h00q") == {WINDOW}


def test_full_attention_only_drops_exactly_the_sliding_layers(tmp_path) -> None:
    result = sniff(tmp_path, ARCH, capture=capture_all(full_attention_only=True))
    assert sorted(result.rows) == sorted([f"l00h{h:02d}q" for h in range(8)] + ["l00h00k", "l00h01k"])
    assert all(sliding_window_values(result.data_root, name) == {None} for name in result.rows)
    card = (result.data_root / "README.md").read_text(encoding="utf-8")
    assert "qwen2 0.1.0" in card and f"Sliding-window layers (layer: window): {{1: {WINDOW}}}" in card


def test_pre_rope_rows_are_biased_projections_that_rotate_into_post_rope_rows(tmp_path, qk_eager_reference) -> None:
    ref = qk_eager_reference(ARCH)
    post = sniff(tmp_path, ARCH, capture=capture_all())
    pre = sniff(tmp_path, ARCH, capture=capture_all(capture_pre_rope=True))
    example_id = TEXTS[3][0]
    length = ref.inputs[example_id].shape[1]
    cos, sin = rope_tables(ref.model, length)
    for layer in range(2):
        for kind, head in (("q", 6), ("k", 1)):
            pre_rows = rows(pre.data_root, layer, head, kind, example_id)
            post_rows = rows(post.data_root, layer, head, kind, example_id)
            np.testing.assert_array_equal(pre_rows[0], post_rows[0])  # position 0: no rotation
            assert all(not np.allclose(pre_rows[i], post_rows[i]) for i in range(1, length))
            tensor = torch.from_numpy(pre_rows)[None, None]
            rotated, _ = apply_rotary_pos_emb(tensor, tensor, cos, sin)
            torch.testing.assert_close(rotated[0, 0], torch.from_numpy(post_rows), atol=1e-5, rtol=1e-5)


def test_key_configs_follow_gqa_mapping(tmp_path) -> None:
    # 8 query heads over 2 key heads: 0-3 -> key head 0, 4-7 -> key head 1; sliding layers too.
    result = sniff(tmp_path, ARCH, capture={"heads": [3, 4], "sampler": {"type": "uniform"}})
    assert sorted(result.rows) == [
        "l00h00k", "l00h01k", "l00h03q", "l00h04q", "l01h00k", "l01h01k", "l01h03q", "l01h04q",
    ]
