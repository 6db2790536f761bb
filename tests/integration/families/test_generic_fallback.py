"""Model types no plugin claims are captured by the core's generic fallback.

``granite`` (scaling = ``attention_multiplier``, not ``head_dim**-0.5``) and
``olmo2`` (a q/k RMSNorm over the whole projection before RoPE) both route
attention through the attention interface and carry ``layer_idx``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.olmo2.modeling_olmo2 import apply_rotary_pos_emb

from qkcore.plugins import make_plugin_manager, resolve_family
from qkcore.testing import TEXTS, capture_all, rope_tables, rows, sniff, tiny_architecture

ARCHITECTURES = {
    "granite": tiny_architecture("granite", attention_multiplier=0.11),
    "olmo2": tiny_architecture("olmo2"),
}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_no_plugin_claims_the_model_type(qk_eager_reference, model_type) -> None:
    ref = qk_eager_reference(ARCHITECTURES[model_type])
    assert resolve_family(make_plugin_manager(), model_type).is_fallback
    assert [(layer.index, layer.kind, layer.num_query_heads, layer.num_key_value_heads) for layer in ref.layers] == [
        (0, "full", 8, 2),
        (1, "full", 8, 2),
    ]
    if model_type == "granite":
        assert ref.layers[0].module.scaling == pytest.approx(0.11)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_rows_reproduce_eager_attention_and_card_names_the_fallback(qk_eager_reference, qk_sniff, model_type) -> None:
    architecture = ARCHITECTURES[model_type]
    result = qk_sniff(architecture, capture=capture_all())
    assert qk_eager_reference(architecture).check(result.data_root) == 2 * 8 * len(TEXTS)
    card = (result.data_root / "README.md").read_text(encoding="utf-8")
    assert f"No plugin handles model_type '{model_type}': captured by the generic fallback." in card
    assert "handled by plugin `qkcore.generic builtin`" in card


def test_olmo2_pre_rope_rows_are_the_norm_outputs(tmp_path, qk_eager_reference) -> None:
    architecture = ARCHITECTURES["olmo2"]
    ref = qk_eager_reference(architecture)
    post = sniff(tmp_path, architecture, capture=capture_all(layers=[0, 1], heads=[5]))
    pre = sniff(tmp_path, architecture, capture=capture_all(layers=[0, 1], heads=[5], capture_pre_rope=True))
    example_id = TEXTS[1][0]
    length = ref.inputs[example_id].shape[1]
    cos, sin = rope_tables(ref.model, length)
    for kind, head in (("q", 5), ("k", 1)):
        pre_rows = rows(pre.data_root, 1, head, kind, example_id)
        post_rows = rows(post.data_root, 1, head, kind, example_id)
        assert not np.allclose(pre_rows[1:], post_rows[1:])
        tensor = torch.from_numpy(pre_rows)[None, None]
        rotated, _ = apply_rotary_pos_emb(tensor, tensor, cos, sin)
        torch.testing.assert_close(rotated[0, 0], torch.from_numpy(post_rows), atol=1e-5, rtol=1e-5)
