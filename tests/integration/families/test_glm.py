"""GLM / GLM-4: partial rotary, so pre- and post-RoPE rows differ only in the rotary dims."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from qk_plugin_glm import rotary_dim

from qkcore.testing import TEXTS, capture_all, rope_tables, rows, sniff, tiny_architecture

MODEL_TYPES = ["glm", "glm4"]
HEAD_DIM = 16
ROTARY_DIM = 8  # partial_rotary_factor defaults to 0.5 in both configs


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_layers_and_rotary_dim(qk_eager_reference, model_type) -> None:
    ref = qk_eager_reference(tiny_architecture(model_type))
    assert ref.family.plugin_name == "glm" and not ref.family.is_fallback
    assert rotary_dim(ref.model) == ROTARY_DIM
    described = [(layer.kind, layer.sliding_window, layer.head_dim) for layer in ref.layers]
    assert described == [("full", None, HEAD_DIM)] * 2


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_rows_reproduce_eager_attention(qk_eager_reference, qk_sniff, model_type, attn_implementation) -> None:
    architecture = tiny_architecture(model_type)
    result = qk_sniff(architecture, model={"attn_implementation": attn_implementation}, capture=capture_all())
    assert len(result.rows) == 2 * (8 + 2)
    assert qk_eager_reference(architecture).check(result.data_root) == 2 * 8 * len(TEXTS)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pre_and_post_rope_rows_differ_only_in_rotary_dims(tmp_path, qk_eager_reference, model_type) -> None:
    architecture = tiny_architecture(model_type)
    ref = qk_eager_reference(architecture)
    post = sniff(tmp_path, architecture, capture=capture_all())
    pre = sniff(tmp_path, architecture, capture=capture_all(capture_pre_rope=True))
    apply_rotary_pos_emb = importlib.import_module(
        f"transformers.models.{model_type}.modeling_{model_type}"
    ).apply_rotary_pos_emb
    example_id = TEXTS[4][0]
    length = ref.inputs[example_id].shape[1]
    cos, sin = rope_tables(ref.model, length)
    for layer in range(2):
        for kind, head in (("q", 2), ("k", 0)):
            pre_rows = rows(pre.data_root, layer, head, kind, example_id)
            post_rows = rows(post.data_root, layer, head, kind, example_id)
            np.testing.assert_array_equal(pre_rows[:, ROTARY_DIM:], post_rows[:, ROTARY_DIM:])
            np.testing.assert_array_equal(pre_rows[0], post_rows[0])
            assert all(not np.allclose(pre_rows[i, :ROTARY_DIM], post_rows[i, :ROTARY_DIM]) for i in range(1, length))
            tensor = torch.from_numpy(pre_rows)[None, None]
            rotated, _ = apply_rotary_pos_emb(tensor, tensor, cos, sin)
            torch.testing.assert_close(rotated[0, 0], torch.from_numpy(post_rows), atol=1e-5, rtol=1e-5)
    card = (post.data_root / "README.md").read_text(encoding="utf-8")
    assert f"only the first {ROTARY_DIM} of {HEAD_DIM} dims" in card


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_key_configs_follow_gqa_mapping(qk_sniff, model_type) -> None:
    result = qk_sniff(tiny_architecture(model_type), capture={"layers": [0], "heads": [3, 4, 7], "sampler": {"type": "uniform"}})
    assert sorted(result.rows) == ["l00h00k", "l00h01k", "l00h03q", "l00h04q", "l00h07q"]
