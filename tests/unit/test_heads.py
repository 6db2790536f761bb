"""Head selection and GQA mapping, which must match the original tool."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkcore.heads import key_head_for, map_key_heads, sample_query_heads, validate_filters


@dataclass(frozen=True)
class FakeLayer:
    index: int
    kind: str
    num_query_heads: int


LAYERS = [
    FakeLayer(0, "full", 4),
    FakeLayer(1, "sliding", 4),
    FakeLayer(2, "cross", 4),
    FakeLayer(3, "full", 4),
    FakeLayer(4, "sliding", 4),
]


def _select(layers=LAYERS, **kw):  # type: ignore[no-untyped-def]
    args = {"layer_filter": None, "head_filter": None, "full_attention_only": False, "count": None, "seed": 0}
    args.update(kw)
    return sample_query_heads(layers, **args).heads


# --- GQA mapping ----------------------------------------------------------------------


def test_key_head_for_32q_8kv() -> None:
    assert [key_head_for(q, 32, 8) for q in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert key_head_for(31, 32, 8) == 7
    assert [key_head_for(q, 8, 8) for q in range(8)] == list(range(8))  # MHA
    assert {key_head_for(q, 8, 1) for q in range(8)} == {0}  # MQA


@given(st.integers(1, 64), st.integers(1, 16), st.data())
def test_key_head_for_any_valid(n_kv: int, group: int, data: st.DataObject) -> None:
    n_q = n_kv * group
    q = data.draw(st.integers(0, n_q - 1))
    kv = key_head_for(q, n_q, n_kv)
    assert 0 <= kv < n_kv
    assert kv == q // group
    assert [key_head_for(x, n_q, n_kv) for x in range(n_q)] == [h for h in range(n_kv) for _ in range(group)]


@pytest.mark.parametrize(
    ("q", "n_q", "n_kv"), [(0, 32, 6), (0, 0, 1), (0, 8, 0), (0, -8, -4), (-1, 8, 2), (8, 8, 2), (0, 4, 8)]
)
def test_key_head_for_invalid(q: int, n_q: int, n_kv: int) -> None:
    with pytest.raises(ValueError):
        key_head_for(q, n_q, n_kv)


def test_map_key_heads() -> None:
    assert map_key_heads([7, 0, 1, 5, 4], 32, 8) == {7: 1, 0: 0, 1: 0, 5: 1, 4: 1}
    assert map_key_heads([], 32, 8) == {}
    assert map_key_heads([3, 1], 4, 4, mapper=lambda q, n_q, n_kv: n_kv - 1 - q) == {3: 0, 1: 2}


# --- selection ------------------------------------------------------------------------


def test_select_all_skips_cross() -> None:
    assert _select() == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3]}


def test_select_full_only_and_filters() -> None:
    assert _select(full_attention_only=True) == {0: [0, 1, 2, 3], 3: [0, 1, 2, 3]}
    assert _select(layer_filter=[4, 2, 1], head_filter=[3, 1, 9]) == {1: [1, 3], 4: [1, 3]}
    assert _select(layer_filter=[1, 4], full_attention_only=True) == {}


def test_select_count_matches_random_sample_exactly() -> None:
    candidates = [(layer, q) for layer in (0, 1, 3, 4) for q in (0, 2)]  # layer-major, heads ascending
    for seed in range(20):
        picked = random.Random(seed).sample(candidates, 3)
        expected: dict[int, list[int]] = {}
        for layer, q in picked:
            expected.setdefault(layer, []).append(q)
        expected = {k: sorted(v) for k, v in sorted(expected.items())}
        got = _select(head_filter=[2, 0], count=3, seed=seed)
        assert got == expected
        assert list(got) == sorted(got)


def test_select_count_not_exceeded_or_unused() -> None:
    assert _select(count=100) == _select()  # fewer candidates than count: all, no sampling
    assert _select(count=16) == _select()
    assert _select(count=0) == {}
    with pytest.raises(ValueError):
        _select(count=-1)


def test_select_respects_given_layer_order() -> None:
    # Candidate order follows the given layer order, which changes what sample() picks.
    reordered = list(reversed(LAYERS))
    candidates = [(layer.index, q) for layer in reordered if layer.kind != "cross" for q in range(4)]
    picked = random.Random(5).sample(candidates, 5)
    got = _select(layers=reordered, count=5, seed=5)
    assert sorted((k, q) for k, qs in got.items() for q in qs) == sorted(picked)


# --- candidate rules ------------------------------------------------------------------


def _sample(rule: str, **kw):  # type: ignore[no-untyped-def]
    args = {"layer_filter": None, "head_filter": None, "full_attention_only": False, "count": None, "seed": 0}
    args.update(kw)
    return sample_query_heads(LAYERS, candidates=rule, **args)


def test_all_decoder_layers_samples_cross_layers_then_drops_their_picks() -> None:
    # The original tool's list: every layer, cross included (layer 2), layer-major, heads ascending.
    candidates = [(layer, q) for layer in range(5) for q in range(4)]
    picked = random.Random(3).sample(candidates, 9)
    expected: dict[int, list[int]] = {}
    for layer, q in sorted(picked):
        if layer != 2:
            expected.setdefault(layer, []).append(q)
    selection = _sample("all_decoder_layers", count=9, seed=3)
    assert selection.heads == expected
    assert selection.uncaptured_picks == sum(1 for layer, _ in picked if layer == 2) == 3  # fixed for seed 3
    assert selection.num_heads == 6 and selection.candidates == 20 and selection.candidate_layers == 5
    assert selection.heads == {1: [0, 3], 3: [2], 4: [1, 2, 3]}  # fixed for seed 3


def test_all_decoder_layers_full_only_drops_sliding_but_keeps_cross_candidates() -> None:
    candidates = [(layer, q) for layer in (0, 2, 3) for q in range(4)]
    picked = random.Random(0).sample(candidates, 6)
    selection = _sample("all_decoder_layers", full_attention_only=True, count=6)
    assert selection.pairs == {pair for pair in picked if pair[0] != 2}
    assert selection.candidates == 12 and selection.candidate_layers == 3
    # The default rule samples the 8 candidates of layers 0 and 3: another selection.
    default = _sample("eligible_layers", full_attention_only=True, count=6)
    assert default.candidates == 8 and default.num_heads == 6 and default.uncaptured_picks == 0
    assert default.pairs == set(random.Random(0).sample([(l, q) for l in (0, 3) for q in range(4)], 6))


def test_rules_agree_without_cross_layers_or_sampling() -> None:
    no_cross = [layer for layer in LAYERS if layer.kind != "cross"]
    for seed in range(10):
        kw = {"layer_filter": None, "head_filter": [0, 3], "full_attention_only": False, "count": 5, "seed": seed}
        assert sample_query_heads(no_cross, candidates="all_decoder_layers", **kw).heads == sample_query_heads(
            no_cross, **kw
        ).heads
    # Without sampling every candidate is taken, and cross-attention is never captured.
    assert _sample("all_decoder_layers").heads == _sample("eligible_layers").heads == _select()
    assert _sample("all_decoder_layers").uncaptured_picks == 4


def test_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown candidate rule"):
        _sample("everything")


def test_selection_descriptions() -> None:
    assert _sample("eligible_layers").describe() == (
        "all 16 query heads of the 4 eligible layers (no capture.head_sampling)"
    )
    assert _sample("eligible_layers", count=5).describe() == (
        "5 of 16 candidate query heads of the 4 eligible layers, picked by random.Random(0).sample "
        "(capture.head_sampling.candidates: eligible_layers)"
    )
    assert _sample("eligible_layers", count=40, full_attention_only=True).describe() == (
        "all 8 candidate query heads of the 2 eligible layers (count 40 >= candidates) "
        "(capture.head_sampling.candidates: eligible_layers)"
    )
    selection = _sample("all_decoder_layers", count=9, seed=3)
    assert selection.describe() == (
        "9 of 20 candidate query heads of all 5 decoder layers, cross-attention included as in the original "
        "sniff-qk, picked by random.Random(3).sample (capture.head_sampling.candidates: all_decoder_layers); "
        "3 picks on cross-attention layers are not captured, leaving 6 query heads"
    )


layers_st = st.lists(
    st.builds(FakeLayer, st.integers(0, 40), st.sampled_from(["full", "sliding", "cross"]), st.integers(1, 12)),
    max_size=12,
    unique_by=lambda layer: layer.index,
)


@given(
    layers_st,
    st.none() | st.lists(st.integers(0, 45), max_size=8),
    st.none() | st.lists(st.integers(0, 14), max_size=8),
    st.booleans(),
    st.none() | st.integers(0, 60),
    st.integers(0, 2**32),
)
def test_select_properties(  # type: ignore[no-untyped-def]
    layers, layer_filter, head_filter, full_only, count, seed
) -> None:
    kw = {
        "layer_filter": layer_filter,
        "head_filter": head_filter,
        "full_attention_only": full_only,
        "count": count,
        "seed": seed,
    }
    got = sample_query_heads(layers, **kw).heads
    assert got == sample_query_heads(layers, **kw).heads  # reproducible
    by_index = {layer.index: layer for layer in layers}
    total = 0
    for index, heads in got.items():
        layer = by_index[index]
        assert layer.kind != "cross"
        if full_only:
            assert layer.kind == "full"
        if layer_filter is not None:
            assert index in layer_filter
        assert heads and heads == sorted(set(heads))
        assert all(0 <= q < layer.num_query_heads for q in heads)
        if head_filter is not None:
            assert set(heads) <= set(head_filter)
        total += len(heads)
    assert list(got) == sorted(got)
    if count is not None:
        assert total <= count
    uncapped = sample_query_heads(layers, **{**kw, "count": None}).heads
    uncapped_total = sum(len(v) for v in uncapped.values())
    assert total == (uncapped_total if count is None else min(count, uncapped_total))
    # The original tool's rule: cross-attention layers are candidates too, their picks dropped.
    original = sample_query_heads(layers, candidates="all_decoder_layers", **kw)
    assert all(by_index[index].kind != "cross" for index in original.heads)
    assert set(original.heads) <= set(uncapped)  # only layers the default rule could capture
    drawn = original.candidates if count is None else min(count, original.candidates)
    assert original.num_heads + original.uncaptured_picks == drawn
    if not any(layer.kind == "cross" for layer in layers):
        assert original.heads == got and original.uncaptured_picks == 0


# --- filter validation ----------------------------------------------------------------


def test_validate_filters() -> None:
    assert validate_filters(LAYERS, None, None) == []
    assert validate_filters(LAYERS, [0, 2, 4], [0, 3]) == []
    problems = validate_filters(LAYERS, [5, 0, -1], [4, 1, -2])
    assert len(problems) == 4
    assert any("layer 5" in p and "0..4" in p for p in problems)
    assert any("layer -1" in p for p in problems)
    assert any("head 4" in p and "0..3" in p for p in problems)
    assert any("head -2" in p for p in problems)
    mixed = [FakeLayer(0, "full", 8), FakeLayer(1, "sliding", 4)]
    assert validate_filters(mixed, None, [7]) == []
    assert len(validate_filters(mixed, None, [8])) == 1


# --- the setting ---------------------------------------------------------------------


def test_candidates_setting_is_validated(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from qkcore.config import ConfigError, load_config
    from tests.conftest import make_config

    path = make_config(tmp_path, capture={"head_sampling": {"count": 3, "candidates": "all_decoder_layers"}})
    assert load_config(path, env={}).capture.head_sampling.candidates == "all_decoder_layers"
    default = make_config(tmp_path, capture={"head_sampling": {"count": 3}})
    assert load_config(default, env={}).capture.head_sampling.candidates == "eligible_layers"
    bad = make_config(tmp_path, capture={"head_sampling": {"count": 3, "candidates": "all_layers"}})
    with pytest.raises(ConfigError, match=r"run\.yaml: capture\.head_sampling\.candidates"):
        load_config(bad, env={})
