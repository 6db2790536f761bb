"""Tests of qk-plugin-gemma3 that need only the installed ``qkcore`` and ``qk_plugin_gemma3``.

Layers alternate sliding (window 8, shorter than every document) and full
attention; logits are scaled by ``query_pre_attn_scalar ** -0.5``; q/k pass a
per-head RMS norm before RoPE, so pre-RoPE rows are the norms' outputs.

The oracle (:meth:`qkcore.testing.EagerReference.check`) recomputes attention
from the written rows and compares it with the same random model's eager attention.
Run with ``pytest plugins/gemma3/tests`` (or ``pytest`` in this package's folder).
The fixtures ``qk_eager_reference``, ``qk_capture`` and ``qk_sniff`` come from the
kit's pytest plugin, loaded by ``pytest_plugins`` below.
"""

from __future__ import annotations

import pytest
import torch

import qk_plugin_gemma3
from qkcore.plugins import list_plugins, make_plugin_manager
from qkcore.testing import (
    card_notes,
    expected_sampled_configs,
    post_rope_claims,
    read_rows,
    single_torch_thread,
    sliding_window_values,
)

pytest_plugins = ["qkcore.testing"]

HEAD_DIM, N_Q, N_KV, WINDOW, QUERY_PRE_ATTN_SCALAR = 16, 4, 2, 8, 24

#: A real Gemma3TextConfig, shrunk: sliding, full, sliding.
GEMMA3_TEXT = {
    "model_type": "gemma3_text",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": N_Q,
    "num_key_value_heads": N_KV,
    "head_dim": HEAD_DIM,
    "query_pre_attn_scalar": QUERY_PRE_ATTN_SCALAR,
    "sliding_window": WINDOW,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "vocab_size": 259,
    "pad_token_id": 256,
    "max_position_embeddings": 512,
}
WINDOWS = {0: WINDOW, 1: None, 2: WINDOW}

#: The vision-language wrapper (gemma-3-4b and larger): only its text decoder runs.
GEMMA3 = {
    "model_type": "gemma3",
    "text_config": {**GEMMA3_TEXT, "num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"]},
    "vision_config": {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    },
    "mm_tokens_per_image": 4,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_torch_thread():
        yield


def test_the_installed_plugin_claims_both_model_types() -> None:
    info = next(p for p in list_plugins(make_plugin_manager()) if p.name == "gemma3")
    assert (info.package, info.version, info.model_types) == ("qk-plugin-gemma3", "0.1.0", ("gemma3", "gemma3_text"))
    assert qk_plugin_gemma3.qkcore_model_types() == ["gemma3", "gemma3_text"]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_rows_reproduce_eager_attention(qk_eager_reference, qk_capture, qk_sniff, attn_implementation) -> None:
    reference = qk_eager_reference(GEMMA3_TEXT)
    result = qk_capture(GEMMA3_TEXT) if attn_implementation == "sdpa" else qk_sniff(
        GEMMA3_TEXT, model={"attn_implementation": attn_implementation}
    )
    assert len(result.rows) == GEMMA3_TEXT["num_hidden_layers"] * (N_Q + N_KV)
    # Logits are scaled by query_pre_attn_scalar ** -0.5, the modules' own scaling that check() uses.
    assert {layer.module.scaling for layer in reference.layers} == {QUERY_PRE_ATTN_SCALAR**-0.5}
    checked = reference.check(result.data_root)
    assert checked == GEMMA3_TEXT["num_hidden_layers"] * N_Q * len(reference.attentions)
    for name in result.rows:
        assert sliding_window_values(result.data_root, name) == {WINDOWS[int(name[1:3])]}, name


def test_pre_rope_rows_are_normed_and_rotate_into_post_rope_rows(qk_eager_reference, qk_capture, qk_sniff) -> None:
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    reference, post = qk_eager_reference(GEMMA3_TEXT), qk_capture(GEMMA3_TEXT)
    pre = qk_sniff(GEMMA3_TEXT, capture={"capture_pre_rope": True})
    assert set(pre.rows) == set(post.rows)
    example_id = "doc-b"
    length = reference.inputs[example_id].shape[1]
    layer_types = GEMMA3_TEXT["layer_types"]
    for layer in range(GEMMA3_TEXT["num_hidden_layers"]):
        # Sliding and full layers rotate with different RoPE bases.
        cos, sin = reference.backbone.rotary_emb(torch.zeros(1), torch.arange(length)[None], layer_types[layer])
        for kind, head in (("q", 3), ("k", 0)):
            name = f"l{layer:02d}h{head:02d}{kind}"
            _, pre_rows, _ = read_rows(pre.data_root, name, example_id)
            _, post_rows, _ = read_rows(post.data_root, name, example_id)
            pre_t, post_t = torch.from_numpy(pre_rows), torch.from_numpy(post_rows)
            # After the per-head RMS norm (weights start at 0, i.e. gain 1): rows have norm sqrt(head_dim) (up to eps).
            torch.testing.assert_close(pre_t.norm(dim=-1), torch.full((length,), HEAD_DIM**0.5), atol=0, rtol=1e-3)
            torch.testing.assert_close(pre_t[0], post_t[0])  # position 0: no rotation
            assert all(not torch.allclose(pre_t[i], post_t[i]) for i in range(1, length)), name
            rotated, _ = apply_rotary_pos_emb(pre_t[None, None], pre_t[None, None], cos, sin)
            torch.testing.assert_close(rotated[0, 0], post_t, atol=1e-5, rtol=1e-5, msg=name)


def test_full_attention_only_drops_exactly_the_sliding_layers(qk_sniff) -> None:
    result = qk_sniff(GEMMA3_TEXT, capture={"full_attention_only": True, "sampler": {"type": "uniform"}})
    assert sorted(result.rows) == sorted([f"l01h{h:02d}q" for h in range(N_Q)] + [f"l01h{h:02d}k" for h in range(N_KV)])
    for name in result.rows:
        assert sliding_window_values(result.data_root, name) == {None}


def test_head_sampling_follows_gqa(qk_sniff) -> None:
    capture = {"head_sampling": {"count": 3, "seed": 1}, "sampler": {"type": "uniform"}}
    result = qk_sniff(GEMMA3_TEXT, capture=capture)
    assert sorted(result.rows) == expected_sampled_configs([0, 1, 2], N_Q, N_KV, count=3, seed=1)


def test_softcapping_matches_what_the_model_applies(qk_eager_reference, qk_sniff) -> None:
    capped = {**GEMMA3_TEXT, "attn_logit_softcapping": 2.0}
    reference, capped_reference = qk_eager_reference(GEMMA3_TEXT), qk_eager_reference(capped)
    # Does this transformers cap Gemma 3's attention logits? (5.23 does not pass the cap to the kernel.)
    applied = any(
        not torch.allclose(a, b)
        for example_id in reference.attentions
        for a, b in zip(reference.attentions[example_id], capped_reference.attentions[example_id])
    )
    result = qk_sniff(capped, model={"attn_implementation": "eager"})
    capped_reference.check(result.data_root, softcap=2.0 if applied else None)
    assert "attn_logit_softcapping = 2.0" in (result.data_root / "README.md").read_text()


def test_vision_language_wrapper_captures_its_text_decoder(qk_eager_reference, qk_sniff) -> None:
    from transformers import Gemma3ForConditionalGeneration

    reference = qk_eager_reference(GEMMA3)
    assert isinstance(reference.model, Gemma3ForConditionalGeneration)
    assert reference.backbone is reference.model.model.language_model
    result = qk_sniff(GEMMA3)
    checked = reference.check(result.data_root)
    assert checked == 2 * N_Q * len(reference.attentions)


def test_card_notes_of_a_pre_rope_run_make_no_post_rope_claim(qk_eager_reference) -> None:
    reference = qk_eager_reference(GEMMA3_TEXT)
    pre = card_notes(reference.model, reference.family, pre_rope=True)
    assert pre and post_rope_claims(pre) == []
    assert "Q/K are the per-head RMS-normalised (q_norm/k_norm) query/key states before rotary embedding" in pre[0]
    # The post-RoPE notes say what post-RoPE rows are (the same words as before the stage was considered).
    post = card_notes(reference.model, reference.family)
    assert post[0] == (
        "Gemma 3: Q/K are the per-head RMS-normalised (q_norm/k_norm) query/key states after rotary "
        "embedding; pre-RoPE rows are the norms' outputs."
    )
    assert pre[1:] == post[1:]  # scale and windows do not depend on the stage
