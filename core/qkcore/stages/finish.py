"""Stage 4 of a run: the final files, the card and the manifest, from the writer's statistics.

:func:`finish` writes every config's ``data.parquet`` from the staged parts into the
final folder, then the card (:func:`model_entry` describes the run) and the manifest
from the statistics the writer gathered while writing (never by rereading the files),
and commits the ``finalized`` state listing those files.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import structlog
import torch

from qkcore import __version__, tensor_parallel
from qkcore.card import ModelEntry, render_card
from qkcore.config import config_to_dict
from qkcore.datafile import ConfigStats
from qkcore.example_ids import EXAMPLE_ID_RULE, find_int32_collisions
from qkcore.fsutil import remove_tree, sha256_file, write_text_durably
from qkcore.layers import AttentionLayer
from qkcore.layout import CARD_FILE, MANIFEST_FILE, config_file
from qkcore.manifest import Manifest
from qkcore.output import file_entry
from qkcore.run_state import PublishedFile, RunState, RunSummary
from qkcore.sources.model import precision
from qkcore.stages.capture import Sniffer
from qkcore.writer import DatasetWriter

log = structlog.get_logger(__name__)


def finish(sniffer: Sniffer, writer: DatasetWriter, state: RunState, final: Path) -> RunState:
    """Final files, card and manifest into ``final``; the ``finalized`` state committed; parts freed."""
    remove_tree(final)  # leftovers of an interrupted finish are rewritten from the parts
    stats = writer.write_final_files(final)
    entry = model_entry(sniffer, state, stats)
    out = sniffer.cfg.output
    card = render_card(entry, stats, hub_repo=out.hf_repo_id, hub_branch=out.hf_branch, license=out.license)
    write_text_durably(final / CARD_FILE, card)
    manifest = Manifest(state.identity, stats, card_sha256=sha256_file(final / CARD_FILE),
                        documents=state.documents, tokens=state.tokens)
    write_text_durably(final / MANIFEST_FILE, manifest.to_json())
    files = {config_file(name): PublishedFile(s.size, s.sha256) for name, s in stats.items()}
    for name in (CARD_FILE, MANIFEST_FILE):
        entry_ = file_entry(final / name)
        files[name] = PublishedFile(entry_.size, entry_.sha256)
    state = replace(state, phase="finalized", files=files, summary=entry.summary())
    writer.commit(state.to_json())
    writer.drop_parts()
    if entry.nonfinite_rows:
        log.warning("rows with NaN or infinity were written; the card and qkcore.json count them",
                    rows=entry.nonfinite_rows)
    return state


def model_entry(sniffer: Sniffer, state: RunState, stats: dict[str, ConfigStats]) -> ModelEntry:
    """The card's description of this run: model, settings, heads, counts."""
    import transformers

    cfg, family, plan = sniffer.cfg, sniffer.family, sniffer.plan
    layers: list[AttentionLayer] = plan.all_layers
    notes: list[str] = []
    for provided in family.hooks.qkcore_card_notes(model=sniffer.model, layers=layers, plan=plan):
        notes.extend(provided or [])
    if family.is_fallback:
        notes.append(f"No plugin handles model_type '{family.model_type}': captured by the generic fallback.")
    collisions = find_int32_collisions(set(state.example_ids))
    if collisions:
        log.warning("example ids collide in the int32 column", collisions=dict(list(collisions.items())[:5]))
        notes.append(f"{len(collisions)} int32 example_id value(s) are shared by distinct documents.")
    settings = config_to_dict(cfg)
    dataset = dict(settings["dataset"])
    dataset["path"] = _display_path(cfg.dataset.path)
    dataset.pop("streaming", None)
    return ModelEntry(
        name=sniffer.model_name,
        revision=cfg.model.revision,
        model_type=family.model_type,
        plugin=f"{family.plugin_name} {family.plugin_version}",
        num_layers=len(layers),
        num_query_heads=layers[0].num_query_heads,
        num_key_value_heads=layers[0].num_key_value_heads,
        head_dim=layers[0].head_dim,
        source_dataset=dataset,
        sampler=sniffer.sampler.describe(),
        capture=dict(settings["capture"]),
        selected_heads={layer: heads for (layer, kind), heads in sorted(plan.heads.items()) if kind == "q"},
        key_heads={layer: heads for (layer, kind), heads in sorted(plan.heads.items()) if kind == "k"},
        key_head_of_query={layer: dict(sorted(m.items())) for layer, m in sorted(plan.key_head_of.items())},
        layer_kinds={layer.index: layer.kind for layer in layers},
        sliding_windows={layer.index: layer.sliding_window for layer in layers},
        rope_layers={index: site.applies_rope for index, site in sorted(plan.rope_sites.items())},
        notes=notes,
        example_id_rule=EXAMPLE_ID_RULE,
        documents=state.documents,
        tokens=state.tokens,
        qkcore_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        skipped_documents=state.skipped,
        nonfinite_rows=sum(s.nonfinite_rows for s in stats.values()),
        weights=sniffer.inputs.identity.weights,
        precision={
            **precision(cfg.model, sniffer.device, sniffer.inputs.architecture).card(),
            "dtype": str(sniffer.model_dtype).removeprefix("torch."),
            "attn_implementation": cfg.model.attn_implementation,
            "device": sniffer.device.type,
            "autocast": None if sniffer.autocast_dtype is None else str(sniffer.autocast_dtype).removeprefix("torch."),
            "batch_size": cfg.inference.batch_size,
            **tensor_parallel.card_fields(sniffer.ranks),  # issue 19
        },
        tokenizer={
            "name": cfg.tokenizer.name or cfg.model.name,
            "revision": cfg.tokenizer.revision,
            "max_length": cfg.tokenizer.max_length,
        },
        versions={"torch": str(torch.__version__), "transformers": str(transformers.__version__)},
        head_selection=plan.head_selection + (f" NOTE: {plan.head_selection_note}" if plan.head_selection_note else ""),
        run_key=state.run_key,
    )


def _display_path(path: str) -> str:
    """A dataset path for the card: a Hub id as is, a local path by its name (no machine's directories)."""
    local = Path(path)
    return local.name if local.is_absolute() else path
