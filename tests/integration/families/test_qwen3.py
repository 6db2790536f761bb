"""Qwen3: per-head q_norm/k_norm before RoPE, optional YaRN from config_overrides."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

from qkcore.config import load_config
from qkcore.sources.model import load_architecture
from qkcore.testing import TEXTS, capture_all, rope_tables, rows, sniff, tiny_architecture

ARCH = tiny_architecture("qwen3")
#: Exactly as the protocol's Qwen3 configs write it.
YARN = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
YARN_SCALING = 0.1 * math.log(4.0) + 1.0  # YaRN's default attention factor for factor 4


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_rows_reproduce_eager_attention(qk_eager_reference, qk_sniff, attn_implementation) -> None:
    result = qk_sniff(ARCH, model={"attn_implementation": attn_implementation}, capture=capture_all())
    assert len(result.rows) == 2 * (8 + 2)
    assert qk_eager_reference(ARCH).check(result.data_root) == 2 * 8 * len(TEXTS)


def test_rows_reproduce_eager_attention_with_yarn(qk_eager_reference, qk_sniff) -> None:
    result = qk_sniff(ARCH, model={"config_overrides": YARN}, capture=capture_all())
    assert qk_eager_reference(ARCH, config_overrides=YARN).check(result.data_root) == 2 * 8 * len(TEXTS)


@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_parameters"])
def test_yarn_overrides_build_a_yarn_rotary_embedding(qk_run_config, spelling) -> None:
    overrides = {spelling: YARN["rope_scaling"]}
    cfg = load_config(qk_run_config(ARCH, model={"config_overrides": overrides}))
    config = load_architecture(cfg.model)
    assert config.rope_parameters["rope_type"] == "yarn"
    assert config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["original_max_position_embeddings"] == 32768
    assert config.rope_parameters["rope_theta"] == 10000.0  # the architecture's theta is kept
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model.model.rotary_emb.rope_type == "yarn"
    assert model.model.rotary_emb.attention_scaling == pytest.approx(YARN_SCALING)


@pytest.mark.parametrize("use_yarn", [False, True], ids=["default", "yarn"])
def test_pre_rope_rows_are_norm_outputs_that_rotate_into_post_rope_rows(tmp_path, qk_eager_reference, use_yarn) -> None:
    model_section = {"config_overrides": YARN} if use_yarn else {}
    ref = qk_eager_reference(ARCH, **model_section)
    post = sniff(tmp_path, ARCH, model=model_section, capture=capture_all())
    pre = sniff(tmp_path, ARCH, model=model_section, capture=capture_all(capture_pre_rope=True))
    assert set(pre.rows) == set(post.rows)
    example_id = TEXTS[1][0]
    length = ref.inputs[example_id].shape[1]
    cos, sin = rope_tables(ref.model, length)
    for layer in range(2):
        attention = ref.model.model.layers[layer].self_attn
        for kind, head, norm in (("q", 5, attention.q_norm), ("k", 1, attention.k_norm)):
            pre_rows = rows(pre.data_root, layer, head, kind, example_id)
            post_rows = rows(post.data_root, layer, head, kind, example_id)
            # q_norm/k_norm are RMSNorms over head_dim with a learned weight: the pre-RoPE
            # rows are normalised (RMS of row / weight == 1).
            rms = np.sqrt(np.mean((pre_rows / norm.weight.detach().numpy()) ** 2, axis=-1))
            np.testing.assert_allclose(rms, 1.0, rtol=1e-4)
            rotated, _ = apply_rotary_pos_emb(
                torch.from_numpy(pre_rows)[None, None], torch.from_numpy(pre_rows)[None, None], cos, sin
            )
            torch.testing.assert_close(rotated[0, 0], torch.from_numpy(post_rows), atol=1e-5, rtol=1e-5)
            # Position 0 is not rotated; YaRN still scales it by attention_scaling.
            scale = YARN_SCALING if use_yarn else 1.0
            np.testing.assert_allclose(post_rows[0], pre_rows[0] * scale, rtol=1e-6, atol=1e-6)
            assert all(not np.allclose(pre_rows[i] * scale, post_rows[i]) for i in range(1, length))


def test_key_configs_follow_gqa_mapping(tmp_path) -> None:
    # 8 query heads over 2 key heads: query heads 0-3 -> key head 0, 4-7 -> key head 1.
    result = sniff(tmp_path, ARCH, capture={"layers": [1], "heads": [2, 6], "sampler": {"type": "uniform"}})
    assert sorted(result.rows) == ["l01h00k", "l01h01k", "l01h02q", "l01h06q"]
    result = sniff(tmp_path, ARCH, capture={"layers": [0], "heads": [0, 3], "sampler": {"type": "uniform"}})
    assert sorted(result.rows) == ["l00h00k", "l00h00q", "l00h03q"]


def test_card_names_the_plugin_and_the_norm_and_yarn(tmp_path) -> None:
    result = sniff(tmp_path, ARCH, model={"config_overrides": YARN}, capture={"layers": [0], "heads": [0]})
    card = (result.data_root / "README.md").read_text(encoding="utf-8")
    assert "qwen3 0.1.0" in card
    assert "q_norm/k_norm" in card
    assert "RoPE type 'yarn'" in card and "attention_scaling=1.13863" in card
