"""Correctness oracle: attention recomputed from the written rows equals the model's own.

With sampler ``all`` every position of every head is written. Rebuilding the
same random model in eager mode and asking for its attention probabilities
gives an independent reference: if a head were mis-mapped, a RoPE stage
wrong or a position shifted, softmax(q·kᵀ·scale + causal) would not match.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from qkcore.config import load_config
from qkcore.sniff import run_sniff
from qkcore.testing import assert_rows_match_eager, eager_reference, read_rows
from tests.conftest import TEXTS, TINY_LLAMA


def _rows(root, layer: int, head: int, kind: str, example_id: int) -> tuple[np.ndarray, np.ndarray]:
    positions, vectors, _ = read_rows(root, f"l{layer:02d}h{head:02d}{kind}", example_id)
    return positions, vectors


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tiny model in eager mode and per-document attention probabilities and inputs."""
    ref = eager_reference(tmp_path_factory.mktemp("ref"), TINY_LLAMA)
    return ref.model, ref.attentions, ref.inputs


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_rows_reproduce_eager_attention_probabilities(tiny_config, reference, attn_implementation) -> None:
    _, attentions, _ = reference
    cfg = load_config(tiny_config(model={"attn_implementation": attn_implementation}, inference={"batch_size": 3}))
    result = run_sniff(cfg)
    n_q, n_kv, head_dim = TINY_LLAMA["num_attention_heads"], TINY_LLAMA["num_key_value_heads"], TINY_LLAMA["head_dim"]
    assert len(result.rows) == TINY_LLAMA["num_hidden_layers"] * (n_q + n_kv)
    checked = assert_rows_match_eager(
        result.data_root, attentions, scaling=lambda layer: head_dim**-0.5, key_head=lambda q: q // (n_q // n_kv)
    )
    assert checked == TINY_LLAMA["num_hidden_layers"] * n_q * len(TEXTS)


def test_pre_rope_rows_rotate_into_post_rope_rows(tiny_config, reference, tmp_path) -> None:
    model, _, inputs = reference
    post = run_sniff(load_config(tiny_config()))
    pre_cfg = load_config(tiny_config(capture={"capture_pre_rope": True}, output={"data_root": str(tmp_path / "pre")}))
    pre = run_sniff(pre_cfg)
    assert set(pre.rows) == set(post.rows)
    example_id = TEXTS[1][0]
    length = inputs[example_id].shape[1]
    position_ids = torch.arange(length)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), position_ids)
    for layer in range(TINY_LLAMA["num_hidden_layers"]):
        for kind, head in (("q", 5), ("k", 1)):
            _, pre_rows = _rows(pre.data_root, layer, head, kind, example_id)
            _, post_rows = _rows(post.data_root, layer, head, kind, example_id)
            # Position 0 has a zero rotation; every later position is rotated.
            np.testing.assert_array_equal(pre_rows[0], post_rows[0])
            assert all(not np.allclose(pre_rows[i], post_rows[i]) for i in range(1, length))
            rotated, _ = apply_rotary_pos_emb(
                torch.from_numpy(pre_rows)[None, None], torch.from_numpy(pre_rows)[None, None], cos, sin
            )
            torch.testing.assert_close(rotated[0, 0], torch.from_numpy(post_rows), atol=1e-5, rtol=1e-5)


def test_key_configs_follow_the_gqa_mapping_of_selected_query_heads(tiny_config) -> None:
    # 8 query heads over 2 key heads: query heads 0-3 use key head 0, 4-7 key head 1.
    cfg = load_config(tiny_config(capture={"layers": [0, 2], "heads": [0, 1, 3], "sampler": {"type": "uniform"}}))
    result = run_sniff(cfg)
    assert sorted(result.rows) == ["l00h00k", "l00h00q", "l00h01q", "l00h03q", "l02h00k", "l02h00q", "l02h01q", "l02h03q"]
    cfg = load_config(tiny_config(capture={"layers": [1], "heads": [4, 7], "sampler": {"type": "uniform"}}))
    # A different run into the same data root replaces the first one's files (with --replace).
    assert sorted(run_sniff(cfg, replace=True).rows) == ["l01h01k", "l01h04q", "l01h07q"]
    assert sorted(p.parent.name for p in result.data_root.glob("l*/data.parquet")) == ["l01h01k", "l01h04q", "l01h07q"]


def test_the_oracle_pairs_heads_by_the_familys_own_mapping(tmp_path) -> None:
    """Before: EagerReference.check hard-coded ``q // q_per_k``, so a plugin's wrong ``qkcore_key_head`` passed it."""
    import types

    from qkcore import hookimpl
    from qkcore.plugins import make_plugin_manager
    from qkcore.testing import capture_all, sniff

    swapped = types.ModuleType("swapped_gqa")  # claims llama and pairs each query group with the other key head
    swapped.qkcore_model_types = hookimpl(lambda: ["llama"])
    swapped.qkcore_key_head = hookimpl(
        lambda query_head, num_query_heads, num_key_value_heads:
        num_key_value_heads - 1 - query_head // (num_query_heads // num_key_value_heads)
    )
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(swapped, name="swapped_gqa")
    reference = eager_reference(tmp_path, TINY_LLAMA, pm=pm)
    assert [reference.key_head(0, q) for q in range(8)] == [1, 1, 1, 1, 0, 0, 0, 0]
    result = sniff(tmp_path, TINY_LLAMA, pm=pm, capture=capture_all())
    with pytest.raises(AssertionError, match=r"^l00h00q example doc-a: Tensor-likes are not close!"):
        reference.check(result.data_root)
