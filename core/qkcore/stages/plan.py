"""The plan stage: what a run captures: the sampler, the layers and the heads.

:func:`plan_capture` is **where heads are chosen and mapped**: eligible layers from
the family's ``qkcore_attention_layers``, query heads by :mod:`qkcore.heads`, key
heads through the family's ``qkcore_key_head`` (GQA), RoPE sites for pre-RoPE
capture. ``qkcore sniff`` and ``qkcore plan`` both call it, so a plan shows exactly
what a run captures.
"""

from __future__ import annotations

import pluggy
import torch

from qkcore.capture import CapturePlan
from qkcore.config import ConfigError, SniffConfig
from qkcore.errors import QkcoreError
from qkcore.heads import HeadSelection, map_key_heads, sample_query_heads, validate_filters
from qkcore.layers import AttentionLayer
from qkcore.plugins import Family, collect_named
from qkcore.samplers import Sampler


def build_sampler(pm: pluggy.PluginManager, cfg: SniffConfig) -> Sampler:
    """The sampler named by ``capture.sampler.type``, from any plugin.

    A sampler name two plugins provide is an error naming both (as for commands and
    model types), whichever name the run asks for.
    """
    factories = {name: factory for name, (_, factory) in collect_named(pm, "qkcore_samplers", "sampler").items()}
    name = cfg.capture.sampler.type
    if name not in factories:
        raise ConfigError(
            f"{cfg.source or '<config>'}: capture.sampler.type: unknown sampler '{name}' "
            f"(known: {', '.join(sorted(factories))})"
        )
    try:
        return factories[name](base_rate=cfg.capture.sampler.base_rate, min_bucket_size=cfg.capture.min_bucket_size)
    except ValueError as exc:
        raise ConfigError(f"{cfg.source or '<config>'}: capture.sampler: {exc}") from exc


def plan_capture(model: torch.nn.Module, family: Family, cfg: SniffConfig, installed: str = "") -> CapturePlan:
    """Decide which layers and heads are captured (see :mod:`qkcore.heads`).

    ``installed`` names the installed plugins, for the error when nothing can be instrumented.
    """
    layers: list[AttentionLayer] = family.hooks.qkcore_attention_layers(model=model) or []
    if not layers:
        raise QkcoreError(
            f"model_type '{family.model_type}' cannot be instrumented: no attention layers found "
            f"(installed plugins: {installed or 'none'})"
        )
    capture = cfg.capture
    problems = validate_filters(layers, capture.layers, capture.heads)
    if problems:
        raise ConfigError(f"{cfg.source or '<config>'}: capture.layers/heads: {'; '.join(problems)}")
    selection = _select(layers, cfg, capture.head_sampling.candidates if capture.head_sampling else "eligible_layers")
    query_heads = selection.heads
    by_index = {layer.index: layer for layer in layers}
    heads: dict[tuple[int, str], list[int]] = {}
    key_head_of: dict[int, dict[int, int]] = {}
    for index, q_heads in query_heads.items():
        layer = by_index[index]
        # The family's GQA mapping, recorded per query head (the card publishes it, so an
        # analysis pairs each query head with the key head the model really used).
        key_head_of[index] = map_key_heads(q_heads, layer.num_query_heads, layer.num_key_value_heads, family.key_head)
        if capture.capture_queries:
            heads[(index, "q")] = list(q_heads)
        if capture.capture_keys:
            heads[(index, "k")] = sorted(set(key_head_of[index].values()))
    if not query_heads:
        kinds = ", ".join(sorted({layer.kind for layer in layers}))
        if selection.uncaptured_picks:  # all_decoder_layers: every pick was a cross-attention head
            raise ConfigError(
                f"{cfg.source or '<config>'}: capture.head_sampling: all {selection.uncaptured_picks} sampled "
                "heads are on cross-attention layers, which are never captured"
            )
        raise ConfigError(
            f"{cfg.source or '<config>'}: capture: no layer is eligible for capture "
            f"(layer kinds: {kinds}; full_attention_only={capture.full_attention_only}, "
            f"layers={capture.layers}, heads={capture.heads})"
        )
    captured = {index: by_index[index] for index in query_heads}
    rope_sites = {index: family.hooks.qkcore_locate_rope(model=model, layer=layer) for index, layer in by_index.items()}
    return CapturePlan(
        layers=captured,
        heads=heads,
        pre_rope=capture.capture_pre_rope,
        rope_sites=rope_sites,
        key_head_of=key_head_of,
        unscaled_queries=capture.unscaled_queries,
        head_selection=selection.describe(),
        head_selection_note=_original_tool_note(layers, cfg, selection),
        all_layers=list(layers),
        eligible_layers=tuple(i for i in selection.candidate_layer_indices if by_index[i].kind != "cross"),
    )


def _select(layers: list[AttentionLayer], cfg: SniffConfig, candidates: str) -> HeadSelection:
    """Query heads picked from ``layers`` by ``cfg``'s filters and head sampling, under rule ``candidates``."""
    capture, sampling = cfg.capture, cfg.capture.head_sampling
    return sample_query_heads(
        layers,
        layer_filter=capture.layers,
        head_filter=capture.heads,
        full_attention_only=capture.full_attention_only,
        count=sampling.count if sampling else None,
        seed=sampling.seed if sampling else 0,
        candidates=candidates,  # type: ignore[arg-type]
    )


def _original_tool_note(layers: list[AttentionLayer], cfg: SniffConfig, selection: HeadSelection) -> str | None:
    """Say how to reproduce the original sniff-qk's heads when this selection differs from them."""
    if selection.rule == "all_decoder_layers":
        return None
    original = _select(layers, cfg, "all_decoder_layers")
    if original.pairs == selection.pairs:
        return None
    return (
        f"the original sniff-qk samples these heads over all decoder layers, cross-attention included, and "
        f"captures {original.num_heads} query heads here ({len(original.pairs & selection.pairs)} in common "
        f"with the {selection.num_heads} chosen now): set capture.head_sampling.candidates: all_decoder_layers "
        "to reproduce its published datasets"
    )
