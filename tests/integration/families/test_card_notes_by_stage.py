"""Each family's card notes are true for the stage the rows were taken at.

A pre-RoPE run (``capture.capture_pre_rope: true``) must find no note saying its
rows are post-RoPE (:func:`qkcore.testing.post_rope_claims`); a post-RoPE run keeps
its notes word for word (the first note of each family is pinned here; Gemma 3's
live in ``plugins/gemma3/tests``).
"""

from __future__ import annotations

import pytest

from qkcore.testing import card_notes, meta_model, post_rope_claims, tiny_architecture
from tests.integration.families.test_generic_answers import CASES

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "rope_theta": 10000.0}
ARCHITECTURES = {
    **{name: architecture for name, (architecture, plugin) in CASES.items() if plugin != "gemma3"},
    "qwen3-yarn": tiny_architecture("qwen3", rope_parameters=YARN),
}

#: The first post-RoPE note of each family plugin, as published before notes knew the stage.
FIRST_POST_ROPE_NOTE = {
    "llama": "Llama: Q/K are the projected query/key states after rotary embedding; all layers are full attention.",
    "qwen2": "Qwen2: Q/K are the biased q_proj/k_proj outputs after rotary embedding.",
    "qwen3": "Qwen3: Q/K are RMS-normalised per head (q_norm/k_norm) before RoPE; post-RoPE rows are post-norm. "
    "Pre-RoPE capture records the q_norm/k_norm outputs.",
    "glm": "GLM partial rotary: only the first 8 of 16 dims of each Q/K head are rotated (interleaved pairs); "
    "dims 8-15 are the unrotated q_proj/k_proj outputs (identical in pre- and post-RoPE captures). All layers are "
    "full attention.",
    "smollm3": "SmolLM3 NoPE layers (no_rope_layers == 0): [3, 7]. On these layers no rotary embedding is applied: "
    "rows are the raw q_proj/k_proj outputs in both capture modes (post-RoPE rows equal pre-RoPE rows). All other "
    "layers are captured after rotary embedding.",
    "ministral": "Mistral family: Q/K are the projected query/key states right after rotary embedding.",
    "mllama": "Mllama (Llama 3.2 Vision): text-only forward of the text decoder; Q/K are the projected "
    "self-attention query/key states after rotary embedding.",
}


@pytest.mark.parametrize("case", sorted(ARCHITECTURES))
def test_pre_rope_notes_make_no_post_rope_claim(case) -> None:
    model, family = meta_model(ARCHITECTURES[case])
    post = card_notes(model, family)
    pre = card_notes(model, family, pre_rope=True)
    assert post_rope_claims(post)  # the post-RoPE notes do say where the rows are taken ...
    assert pre and post_rope_claims(pre) == []  # ... and the pre-RoPE ones never claim that stage
    assert post[0] == FIRST_POST_ROPE_NOTE[family.plugin_name]
    assert len(pre) == len(post)


def test_unscaled_queries_do_not_change_the_stage_words() -> None:
    model, family = meta_model(ARCHITECTURES["ministral3"])
    unscaled = card_notes(model, family, unscaled_queries=True)
    assert unscaled[0] == FIRST_POST_ROPE_NOTE["ministral"]
    assert "Ministral 3 multiplies the query after RoPE by 1 + beta" in unscaled[-1]
    pre = card_notes(model, family, pre_rope=True)
    assert pre[-1].startswith("Ministral 3 multiplies the rotated query by 1 + beta")
    assert pre[-1].endswith("Query rows are pre-RoPE, so they carry no scale.")


def test_yarn_factor_is_in_post_rope_rows_only() -> None:
    model, family = meta_model(ARCHITECTURES["qwen3-yarn"])
    post, pre = card_notes(model, family), card_notes(model, family, pre_rope=True)
    assert post[1].endswith("attention_scaling=1.13863, so post-RoPE Q and K rows each include that factor.")
    assert pre[1].endswith("attention_scaling=1.13863, a factor of the rotation, so these pre-RoPE rows do not include "
                           "it.")


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text", "glm"])
@pytest.mark.parametrize("pre_rope", [False, True], ids=["post", "pre"])
def test_the_rope_site_in_the_notes_is_the_declared_one(model_type, pre_rope) -> None:
    """The notes name the modules the family's qkcore_locate_rope declares, not a hand-written copy of them."""
    from qkcore.capture import CapturePlan
    from qkcore.layers import RopeSite

    model, family = meta_model(tiny_architecture(model_type))
    layers = family.hooks.qkcore_attention_layers(model=model)
    declared = {layer.index: family.hooks.qkcore_locate_rope(model=model, layer=layer) for layer in layers}
    names = {id(module): name for name, module in layers[0].module.named_children()}
    query, key = names[id(declared[0].query_source)], names[id(declared[0].key_source)]
    assert f"{query}/{key}" in " ".join(card_notes(model, family, pre_rope=pre_rope))
    # Declare the sources the other way round: the notes follow.
    swapped = {index: RopeSite(site.applies_rope, site.key_source, site.query_source, site.heads_first)
               for index, site in declared.items()}
    plan = CapturePlan(layers={}, heads={}, pre_rope=pre_rope, rope_sites=swapped)
    notes = " ".join(note for provided in family.hooks.qkcore_card_notes(model=model, layers=layers, plan=plan)
                     for note in provided or [])
    assert f"{key}/{query}" in notes and f"{query}/{key}" not in notes
