"""SmolLM3: NoPE layers (``no_rope_layers[i] == 0``) capture raw projections in both modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.smollm3.modeling_smollm3 import apply_rotary_pos_emb

from qkcore.testing import TEXTS, capture_all, meta_model, rope_tables, rows, sniff, tiny_architecture

#: Layer 0 applies RoPE, layer 1 is NoPE.
ARCH = tiny_architecture("smollm3", no_rope_layers=[1, 0])


def test_default_pattern_makes_every_fourth_layer_nope() -> None:
    model, family = meta_model(tiny_architecture("smollm3", num_hidden_layers=12))
    assert family.plugin_name == "smollm3" and not family.is_fallback
    layers = family.hooks.qkcore_attention_layers(model=model)
    applies = [family.hooks.qkcore_locate_rope(model=model, layer=layer).applies_rope for layer in layers]
    assert [i for i, flag in enumerate(applies) if not flag] == [3, 7, 11]
    # transformers 5 mirrors the config flag on the module as `use_rope` (an int, 0 on NoPE layers).
    assert [bool(layer.module.use_rope) for layer in layers] == applies
    assert all(layer.kind == "full" and layer.sliding_window is None for layer in layers)


def test_sliding_window_applies_to_nope_layers_only_when_enabled() -> None:
    model, family = meta_model(
        tiny_architecture("smollm3", num_hidden_layers=8, use_sliding_window=True, sliding_window=32)
    )
    layers = family.hooks.qkcore_attention_layers(model=model)
    assert {layer.index: layer.sliding_window for layer in layers if layer.kind == "sliding"} == {3: 32, 7: 32}


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_rows_reproduce_eager_attention(qk_eager_reference, qk_sniff, attn_implementation) -> None:
    result = qk_sniff(ARCH, model={"attn_implementation": attn_implementation}, capture=capture_all())
    assert len(result.rows) == 2 * (8 + 2)
    assert qk_eager_reference(ARCH).check(result.data_root) == 2 * 8 * len(TEXTS)


def test_post_rope_equals_pre_rope_on_nope_layers_only(tmp_path, qk_eager_reference) -> None:
    ref = qk_eager_reference(ARCH)
    post = sniff(tmp_path, ARCH, capture=capture_all())
    pre = sniff(tmp_path, ARCH, capture=capture_all(capture_pre_rope=True))
    assert set(pre.rows) == set(post.rows)
    example_id = TEXTS[0][0]
    length = ref.inputs[example_id].shape[1]
    cos, sin = rope_tables(ref.model, length)
    for kind, heads in (("q", range(8)), ("k", range(2))):
        for head in heads:
            # NoPE layer 1: the very same raw projections.
            np.testing.assert_array_equal(
                rows(pre.data_root, 1, head, kind, example_id), rows(post.data_root, 1, head, kind, example_id)
            )
            # RoPE layer 0: rotated, except position 0.
            pre_rows = rows(pre.data_root, 0, head, kind, example_id)
            post_rows = rows(post.data_root, 0, head, kind, example_id)
            np.testing.assert_array_equal(pre_rows[0], post_rows[0])
            assert all(not np.allclose(pre_rows[i], post_rows[i]) for i in range(1, length))
            tensor = torch.from_numpy(pre_rows)[None, None]
            rotated, _ = apply_rotary_pos_emb(tensor, tensor, cos, sin)
            torch.testing.assert_close(rotated[0, 0], torch.from_numpy(post_rows), atol=1e-5, rtol=1e-5)


def test_card_lists_nope_layers(tmp_path) -> None:
    result = sniff(tmp_path, ARCH, capture={"heads": [0], "sampler": {"type": "uniform"}})
    card = (result.data_root / "README.md").read_text(encoding="utf-8")
    assert "smollm3 0.1.0" in card
    assert "SmolLM3 NoPE layers (no_rope_layers == 0): [1]." in card
    assert "NoPE layers (no rotary embedding; post-RoPE equals pre-RoPE there): [1]" in card


def test_key_configs_follow_gqa_mapping(tmp_path) -> None:
    result = sniff(tmp_path, ARCH, capture={"layers": [1], "heads": [1, 5, 7], "sampler": {"type": "uniform"}})
    assert sorted(result.rows) == ["l01h00k", "l01h01k", "l01h01q", "l01h05q", "l01h07q"]
