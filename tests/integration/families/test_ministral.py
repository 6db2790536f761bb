"""Mistral family (plugin ``qk-plugin-ministral``): Ministral 3, Ministral, Mistral 3 wrapper.

Ministral 3 multiplies the query by a position-dependent scale after RoPE. By
default the rows hold the scaled query, the tensor the attention kernel receives
(as the original sniff-qk recorded it); with ``capture.unscaled_queries`` they hold
the query before the scale, and the oracle re-applies it. Sliding windows (8
tokens here) are shorter than every document, so a capture that dropped the
sliding mask would fail the oracle.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qk_plugin_ministral import query_scale
from qkcore.config import ConfigError
from qkcore.testing import (
    expected_sampled_configs,
    read_rows,
    sliding_window_values,
    sniff,
)
from tests.integration.families._support import plugins_list_line

HEAD_DIM, N_Q, N_KV, WINDOW = 16, 4, 2, 8
BETA, ORIGINAL_MAX = 0.5, 32  # the scale is 1 below position 32, then 1.35, 1.55, 1.69
TEXTS_LONGEST = "doc-d"  # 101 bytes
#: 1 + 0.5 * ln(1 + floor(p / 32)) in float32 for p in 0..31, 32..63, 64..95, 96..100 (fixed values).
SCALE_BY_BAND = [1.0, 1.3465735912322998, 1.5493061542510986, 1.6931471824645996]

_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": N_Q,
    "num_key_value_heads": N_KV,
    "head_dim": HEAD_DIM,
    "vocab_size": 259,
    "pad_token_id": 256,
}

#: A real Ministral3Config, shrunk; YaRN as in the checkpoints, model-wide sliding window.
MINISTRAL3 = {
    "model_type": "ministral3",
    **_TEXT,
    "num_hidden_layers": 2,
    "max_position_embeddings": 4 * ORIGINAL_MAX,
    "sliding_window": WINDOW,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": ORIGINAL_MAX,
        "llama_4_scaling_beta": BETA,
    },
}

#: A real MinistralConfig: per-layer sliding/full attention from layer_types.
MINISTRAL = {
    "model_type": "ministral",
    **_TEXT,
    "num_hidden_layers": 3,
    "sliding_window": WINDOW,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
}

#: A real MistralConfig: one model-wide window, so every layer is sliding.
MISTRAL = {"model_type": "mistral", **_TEXT, "num_hidden_layers": 2, "sliding_window": WINDOW}

#: The vision-language wrapper the Ministral 3 hub checkpoints use; only its text decoder runs.
MISTRAL3 = {
    "model_type": "mistral3",
    "text_config": {**MINISTRAL3, "num_hidden_layers": 1},
    "vision_config": {
        "model_type": "pixtral",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 16,
    },
}


def _reapply_scale(layer: int, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return q * query_scale(positions, BETA, ORIGINAL_MAX)[:, None]


@pytest.fixture(scope="module")
def kernel_queries(qk_eager_reference):
    ministral3 = qk_eager_reference(MINISTRAL3)
    """The query each attention call hands its kernel, per document: ``{id: {layer: (heads, seq, dim)}}``."""
    from transformers.models.ministral3 import modeling_ministral3

    original = modeling_ministral3.eager_attention_forward
    seen: dict[int, torch.Tensor] = {}

    def recording(module, query, *args, **kwargs):
        seen[module.layer_idx] = query[0].detach().clone()
        return original(module, query, *args, **kwargs)

    queries = {}
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(modeling_ministral3, "eager_attention_forward", recording)
        for example_id, ids in ministral3.inputs.items():
            seen.clear()
            ministral3.backbone(input_ids=ids, use_cache=False)
            queries[example_id] = dict(seen)
    return queries


def test_reference_really_masks_beyond_the_window(qk_eager_reference) -> None:
    ministral3 = qk_eager_reference(MINISTRAL3)
    # The oracle is only meaningful if the model itself applies the window.
    probs = ministral3.attentions[TEXTS_LONGEST][0]
    i, j = torch.meshgrid(torch.arange(probs.shape[-1]), torch.arange(probs.shape[-1]), indexing="ij")
    assert probs.shape[-1] > WINDOW
    assert torch.all(probs[:, (i - j) >= WINDOW] == 0)
    assert torch.all(probs[:, (j <= i) & ((i - j) < WINDOW)] > 0)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_ministral3_rows_reproduce_eager_attention(
    qk_eager_reference, qk_capture, tmp_path, attn_implementation
) -> None:
    ministral3 = qk_eager_reference(MINISTRAL3)
    ministral3_post = qk_capture(MINISTRAL3)
    result = ministral3_post if attn_implementation == "sdpa" else sniff(
        tmp_path, MINISTRAL3, model={"attn_implementation": attn_implementation}
    )
    assert len(result.rows) == MINISTRAL3["num_hidden_layers"] * (N_Q + N_KV)
    assert {layer.module.scaling for layer in ministral3.layers} == {HEAD_DIM**-0.5}
    # Default rows are the scaled query the kernel uses: q·k reproduces the attention as is.
    checked = ministral3.check(result.data_root)
    assert checked == MINISTRAL3["num_hidden_layers"] * N_Q * len(ministral3.attentions)
    for name in result.rows:
        assert sliding_window_values(result.data_root, name) == {WINDOW}


def test_ministral3_query_rows_are_the_kernel_query_by_default(qk_capture, kernel_queries) -> None:
    ministral3_post = qk_capture(MINISTRAL3)
    # The longest document runs past original_max_position_embeddings, where the scale is not 1.
    assert kernel_queries[TEXTS_LONGEST][0].shape[1] > 3 * ORIGINAL_MAX
    for example_id, per_layer in kernel_queries.items():
        assert sorted(per_layer) == list(range(MINISTRAL3["num_hidden_layers"]))
        for layer, query in per_layer.items():
            for head in range(N_Q):
                positions, rows, _ = read_rows(ministral3_post.data_root, f"l{layer:02d}h{head:02d}q", example_id)
                assert positions.tolist() == list(range(query.shape[1]))
                torch.testing.assert_close(torch.from_numpy(rows), query[head], atol=1e-5, rtol=1e-5)


def test_ministral3_default_rows_are_not_the_unscaled_form(qk_eager_reference, qk_capture) -> None:
    ministral3 = qk_eager_reference(MINISTRAL3)
    ministral3_post = qk_capture(MINISTRAL3)
    # Re-applying the scale scales positions >= 32 twice: the oracle fails on the first head and
    # document (doc-a, longer than 32 positions), and only because of the rows past position 31.
    with pytest.raises(AssertionError, match=r"^l00h00q example doc-a: Tensor-likes are not close!"):
        ministral3.check(ministral3_post.data_root, query_transform=_reapply_scale)
    ministral3.check(ministral3_post.data_root, query_transform=_reapply_scale_below(ORIGINAL_MAX))


def _reapply_scale_below(end: int):
    """:func:`_reapply_scale` on the first ``end`` positions only (scale 1 there: a no-op), for an
    oracle that must fail or pass on the positions past ``end`` alone."""

    def transform(layer: int, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        scaled = _reapply_scale(layer, q, positions)
        return torch.where((positions < end)[:, None], scaled, q)

    return transform


def test_ministral3_unscaled_queries_divide_the_position_scale_out(qk_eager_reference, qk_capture) -> None:
    ministral3 = qk_eager_reference(MINISTRAL3)
    ministral3_post = qk_capture(MINISTRAL3)
    ministral3_unscaled = qk_capture(MINISTRAL3, capture={"unscaled_queries": True})
    # The option's rows are the query before the scale: re-applying it reproduces the attention ...
    checked = ministral3.check(ministral3_unscaled.data_root, query_transform=_reapply_scale)
    assert checked == MINISTRAL3["num_hidden_layers"] * N_Q * len(ministral3.attentions)
    # ... and default / unscaled is the scale of each position (fixed values), keys identical.
    for name in ministral3_post.rows:
        positions, scaled, _ = read_rows(ministral3_post.data_root, name, TEXTS_LONGEST)
        unscaled_positions, unscaled, _ = read_rows(ministral3_unscaled.data_root, name, TEXTS_LONGEST)
        assert positions.tolist() == unscaled_positions.tolist() == list(range(len(positions)))
        assert len(positions) > 3 * ORIGINAL_MAX  # all four scale bands
        if name.endswith("k"):
            assert np.array_equal(scaled, unscaled), name
            continue
        expected = torch.tensor([SCALE_BY_BAND[p // ORIGINAL_MAX] for p in positions])[:, None].expand(scaled.shape)
        ratio = torch.from_numpy(scaled) / torch.from_numpy(unscaled)
        torch.testing.assert_close(ratio, expected, atol=0, rtol=1e-6, msg=name)
        assert np.array_equal(scaled[:ORIGINAL_MAX], unscaled[:ORIGINAL_MAX]), name  # scale 1: bit-identical


def test_query_scale_at_the_protocol_parameters() -> None:
    # Ministral 3 checkpoints: beta 0.1, original_max_position_embeddings 16384 (fixed float32 values):
    # the published query rows past position 16383 are 1.069x .. 1.208x the unscaled query.
    positions = torch.tensor([0, 16383, 16384, 32767, 32768, 65536, 131071])
    expected = [1.0, 1.0, 1.06931471824646, 1.06931471824646, 1.1098612546920776, 1.1609437465667725,
                1.2079441547393799]
    assert query_scale(positions, 0.1, 16384).tolist() == expected


@pytest.mark.parametrize(
    ("capture", "says", "not_says"),
    [
        ({}, "Query rows include the scale (capture.unscaled_queries: false", "are unscaled"),
        ({"unscaled_queries": True}, "Query rows are unscaled (capture.unscaled_queries: true)", "include the scale"),
        ({"capture_pre_rope": True}, "Query rows are pre-RoPE, so they carry no scale", "include the scale"),
    ],
)
def test_ministral3_card_says_which_query_form(qk_capture, tmp_path, capture, says, not_says) -> None:
    ministral3_post = qk_capture(MINISTRAL3)
    result = ministral3_post if not capture else sniff(tmp_path, {**MINISTRAL3, "num_hidden_layers": 1}, capture=capture)
    card = (result.data_root / "README.md").read_text()
    assert says in card and not_says not in card
    assert f"beta = {BETA:g}" in card and f"original_max_position_embeddings = {ORIGINAL_MAX}" in card


@pytest.fixture(scope="module")
def ministral3_rotated_pre(qk_eager_reference, qk_capture):
    """Pre-RoPE rows of the longest document rotated with the model's RoPE, next to the post-RoPE rows."""
    from transformers.models.ministral3.modeling_ministral3 import apply_rotary_pos_emb

    ministral3 = qk_eager_reference(MINISTRAL3)
    pre = qk_capture(MINISTRAL3, capture={"capture_pre_rope": True})
    length = ministral3.inputs[TEXTS_LONGEST].shape[1]
    cos, sin = ministral3.backbone.rotary_emb(torch.zeros(1), torch.arange(length)[None])
    pairs = {}
    for name in pre.rows:
        _, pre_rows, _ = read_rows(pre.data_root, name, TEXTS_LONGEST)
        pre_t = torch.from_numpy(pre_rows)[None, None]
        rotated, _ = apply_rotary_pos_emb(pre_t, pre_t, cos, sin)
        pairs[name] = (torch.from_numpy(pre_rows), rotated[0, 0])
    return pre, pairs


def test_ministral3_pre_rope_rows_rotate_into_post_rope_rows(qk_capture, ministral3_rotated_pre) -> None:
    ministral3_post = qk_capture(MINISTRAL3)
    pre, pairs = ministral3_rotated_pre
    assert set(pre.rows) == set(ministral3_post.rows)
    for name, (pre_rows, rotated) in pairs.items():
        _, post_rows, _ = read_rows(ministral3_post.data_root, name, TEXTS_LONGEST)
        post_rows = torch.from_numpy(post_rows)
        # RoPE changes every position after 0.
        assert all(not torch.allclose(pre_rows[i], post_rows[i]) for i in range(1, len(post_rows))), name
        # Rotating the pre-RoPE rows gives the post-RoPE rows; below ORIGINAL_MAX the query
        # scale is 1, so this part holds for queries whatever the pre-RoPE path does with it.
        rows = slice(None) if name.endswith("k") else slice(0, ORIGINAL_MAX)
        torch.testing.assert_close(rotated[rows], post_rows[rows], atol=1e-5, rtol=1e-5, msg=name)


def test_ministral3_pre_rope_queries_carry_no_position_scale(qk_capture, ministral3_rotated_pre) -> None:
    ministral3_post = qk_capture(MINISTRAL3)
    ministral3_unscaled = qk_capture(MINISTRAL3, capture={"unscaled_queries": True})
    _, pairs = ministral3_rotated_pre
    for name, (_, rotated) in pairs.items():
        if name.endswith("q"):
            positions, unscaled, _ = read_rows(ministral3_unscaled.data_root, name, TEXTS_LONGEST)
            torch.testing.assert_close(rotated, torch.from_numpy(unscaled), atol=1e-5, rtol=1e-5, msg=name)
            _, scaled, _ = read_rows(ministral3_post.data_root, name, TEXTS_LONGEST)
            rescaled = _reapply_scale(0, rotated, torch.from_numpy(positions))
            torch.testing.assert_close(rescaled, torch.from_numpy(scaled), atol=1e-5, rtol=1e-5, msg=name)


def test_ministral_mixed_layers_oracle_and_eligibility(qk_eager_reference, tmp_path) -> None:
    reference = qk_eager_reference(MINISTRAL)
    result = sniff(tmp_path, MINISTRAL)
    assert len(result.rows) == MINISTRAL["num_hidden_layers"] * (N_Q + N_KV)
    checked = reference.check(result.data_root)
    assert checked == MINISTRAL["num_hidden_layers"] * N_Q * len(reference.attentions)
    windows = {0: WINDOW, 1: None, 2: WINDOW}
    for name in result.rows:
        assert sliding_window_values(result.data_root, name) == {windows[int(name[1:3])]}, name

    full_only = sniff(tmp_path, MINISTRAL, capture={"full_attention_only": True, "sampler": {"type": "uniform"}})
    assert sorted(full_only.rows) == sorted(
        [f"l01h{h:02d}q" for h in range(N_Q)] + [f"l01h{h:02d}k" for h in range(N_KV)]
    )


def test_mistral_model_wide_window_oracle_and_eligibility(qk_eager_reference, tmp_path) -> None:
    reference = qk_eager_reference(MISTRAL)
    result = sniff(tmp_path, MISTRAL)
    checked = reference.check(result.data_root)
    assert checked == MISTRAL["num_hidden_layers"] * N_Q * len(reference.attentions)
    for name in result.rows:
        assert sliding_window_values(result.data_root, name) == {WINDOW}
    # Every layer slides: a full-attention-only capture has nothing to record, and says so before running.
    with pytest.raises(ConfigError, match="no layer is eligible"):
        sniff(tmp_path, MISTRAL, capture={"full_attention_only": True, "sampler": {"type": "uniform"}})


def test_head_sampling_follows_gqa_over_eligible_layers(tmp_path) -> None:
    capture = {"full_attention_only": True, "head_sampling": {"count": 5, "seed": 3}, "sampler": {"type": "uniform"}}
    layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention", "full_attention"]
    result = sniff(tmp_path, {**MINISTRAL, "num_hidden_layers": 5, "layer_types": layer_types}, capture=capture)
    assert sorted(result.rows) == expected_sampled_configs([1, 3, 4], N_Q, N_KV, count=5, seed=3)


def test_mistral3_wrapper_captures_its_text_decoder(qk_eager_reference, tmp_path) -> None:
    from transformers import Mistral3ForConditionalGeneration

    reference = qk_eager_reference(MISTRAL3)
    assert isinstance(reference.model, Mistral3ForConditionalGeneration)
    assert reference.backbone is reference.model.model.language_model
    result = sniff(tmp_path, MISTRAL3)
    checked = reference.check(result.data_root)
    assert checked == N_Q * len(reference.attentions)
    card = (result.data_root / "README.md").read_text()
    assert f"beta = {BETA:g}" in card and "Query rows include the scale" in card


def test_plugins_list_shows_the_ministral_plugin(capsys) -> None:
    line = plugins_list_line(capsys, "ministral")
    assert "qk-plugin-ministral" in line and "0.1.0" in line
    for model_type in ("ministral3", "ministral", "mistral"):
        assert model_type in line
