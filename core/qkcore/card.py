"""The dataset card (``README.md``): what a reader of a published capture needs to trust it.

The front matter (read and written through ``huggingface_hub``'s ``DatasetCard``) declares
one ``datasets`` config per ``lXXhYY[qk]/data.parquet``, so ``load_dataset(root, "l00h00q")``
works locally and on the Hub, plus the Hub metadata users expect (``pretty_name``, ``tags``,
``task_categories``, ``license`` when known) and, under ``qkcore:``, the run key and one model
entry (``models: [entry]``: a data root holds one run) with every setting that decided the rows.
Per-config statistics live in the manifest (``qkcore.json``), not here.

The card is built from the run's own numbers (:class:`~qkcore.writer.ConfigStats`), never by
rereading the files, and describes exactly the files the run publishes.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from qkcore.layout import config_file, parse_config_name, schema_table
from qkcore.datafile import ConfigStats
from qkcore.run_state import RunSummary


@dataclass
class ModelEntry:
    """What one run records about the model it captured and how (the front matter's ``qkcore.models[0]``)."""

    name: str  # model name / hub id
    revision: str | None
    model_type: str
    plugin: str  # plugin name + version that handled it
    num_layers: int
    num_query_heads: int
    num_key_value_heads: int
    head_dim: int
    source_dataset: dict[str, Any]  # path (hub id or file name), name, split, columns, max_samples
    sampler: dict[str, Any]  # sampler.describe()
    capture: dict[str, Any]  # capture_pre_rope, full_attention_only, layer/head filters, head_sampling, ...
    selected_heads: dict[int, list[int]]  # layer -> query heads
    key_heads: dict[int, list[int]]  # layer -> key heads
    key_head_of_query: dict[int, dict[int, int]]  # layer -> {query head: the key head it attends with}
    layer_kinds: dict[int, str]  # layer -> full/sliding/cross
    sliding_windows: dict[int, int | None]
    rope_layers: dict[int, bool]  # layer -> applies RoPE (False = NoPE)
    notes: list[str]  # family notes (NoPE layers, scale choices, ...)
    example_id_rule: str  # how example ids were normalised
    documents: int
    tokens: int
    qkcore_version: str
    created: str  # ISO timestamp (the caller supplies it)
    skipped_documents: int = 0  # empty texts: no tokens, no rows
    nonfinite_rows: int = 0  # rows (over all configs) whose vector holds a NaN or an infinity
    weights: dict[str, Any] = field(default_factory=dict)  # where the weights came from (identity)
    precision: dict[str, Any] = field(default_factory=dict)  # dtype, attention, device, autocast, batch size
    tokenizer: dict[str, Any] = field(default_factory=dict)  # name, revision, max_length
    versions: dict[str, str] = field(default_factory=dict)  # torch, transformers
    head_selection: str = ""  # how the query heads were chosen, in words
    run_key: str = ""

    def summary(self) -> RunSummary:
        """The run in a line: model, date, counts (the record's and the journal's summary)."""
        return RunSummary(self.name, self.created, self.documents, self.tokens, self.skipped_documents,
                          self.nonfinite_rows)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelEntry:
        """Read an entry as :func:`render_card` wrote it (layer and head keys back to ``int``); ``ValueError`` if it is not one."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a qkcore.models entry must be a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in _BY_LAYER:
            if isinstance(values.get(key), Mapping):
                values[key] = {int(layer): v for layer, v in values[key].items()}
        if isinstance(values.get("key_head_of_query"), Mapping):
            values["key_head_of_query"] = {layer: {int(q): int(k) for q, k in heads.items()}
                                           for layer, heads in values["key_head_of_query"].items()}
        try:
            return cls(**values)
        except TypeError as exc:  # a required field is missing
            raise ValueError(str(exc)) from None


#: The entry's fields keyed by layer index.
_BY_LAYER = ("selected_heads", "key_heads", "key_head_of_query", "layer_kinds", "sliding_windows", "rope_layers")


def _plain(value: Any) -> Any:
    """Convert to YAML-safe builtins (numpy scalars, tuples, Paths, dataclasses)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_plain(v) for v in items]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, str)):  # str subclasses (torch's version string) too
        return str(value)
    return value


# --------------------------------------------------------------------------- reading


def read_card(text: str) -> dict[str, Any]:
    """The front matter of a card as a dict (``{}`` when it has none or it is not closed)."""
    import logging

    from huggingface_hub import DatasetCard

    # huggingface_hub logs a warning for a card without metadata; here that is an answer, not a problem.
    logger = logging.getLogger("huggingface_hub.repocard")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        data = DatasetCard(text).data.to_dict()
    except (ValueError, yaml.YAMLError):
        return {}
    finally:
        logger.setLevel(level)
    return data if isinstance(data, dict) else {}


def read_front_matter(path: Path) -> tuple[dict[str, Any], str]:
    """``(front matter, body)`` of the card at ``path``, strictly: a broken one raises ``ValueError`` naming it.

    (:func:`read_card` is the lenient reader, for cards qkcore only looks at.)
    """
    from huggingface_hub import DatasetCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("---"):
        block = REGEX_YAML_BLOCK.search(text)
        if block is None:
            raise ValueError(f"{path}: front matter starts with '---' but is never closed")
        try:
            data = yaml.safe_load(block.group(2))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: front matter is not valid YAML: {exc}") from None
        if data is not None and not isinstance(data, dict):
            raise ValueError(f"{path}: front matter must be a mapping, got {type(data).__name__}")
    card = DatasetCard(text, ignore_metadata_errors=True)
    return card.data.to_dict(), card.text


def card_models(front: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``qkcore.models`` entries of a card's front matter."""
    qk = front.get("qkcore") or {}
    models = qk.get("models") if isinstance(qk, dict) else None
    return [m for m in models or [] if isinstance(m, dict)]


def card_run_key(text: str | None) -> str | None:
    """The qkcore run key a card records, or ``None`` (no card, not a qkcore card)."""
    if not text:
        return None
    qk = read_card(text).get("qkcore")
    key = qk.get("run_key") if isinstance(qk, dict) else None
    return str(key) if key else None


# --------------------------------------------------------------------------- writing


def render_card(
    entry: ModelEntry,
    configs: dict[str, ConfigStats],
    *,
    hub_repo: str | None = None,
    hub_branch: str | None = None,
    license: str | None = None,
) -> str:
    """The card text for one run that published ``configs``."""
    from huggingface_hub import DatasetCardData

    names = sorted(configs, key=lambda n: parse_config_name(n) or (0, 0, ""))
    parsed = [parse_config_name(n) for n in names]
    coverage = {
        "layers": len({p[0] for p in parsed if p}),
        "query_head_configs": sum(1 for p in parsed if p and p[2] == "q"),
        "key_head_configs": sum(1 for p in parsed if p and p[2] == "k"),
        "rows": sum(s.rows for s in configs.values()),
    }
    data = DatasetCardData(
        pretty_name=f"Query/key vectors of {entry.name}",
        license=license,
        tags=["qkcore", "attention", "query-key-vectors", "interpretability"],
        task_categories=["feature-extraction"],
        configs=[{"config_name": n, "data_files": [{"split": "train", "path": config_file(n)}]} for n in names],
        qkcore={"run_key": entry.run_key, "coverage": coverage, "models": [_plain(entry)]},
    )
    body = _body(entry, configs, coverage, names, hub_repo=hub_repo, hub_branch=hub_branch)
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _inline(value: Any) -> str:
    """One-line YAML flow rendering for the markdown body."""
    return yaml.safe_dump(_plain(value), default_flow_style=True, sort_keys=False, width=10**9).strip()


def _by_layer(mapping: dict) -> list[tuple[Any, Any]]:
    return sorted(mapping.items(), key=lambda kv: int(kv[0]))


def _heads_summary(heads: dict) -> str:
    if not heads:
        return "none"
    return "; ".join(f"layer {layer}: {list(hs)}" for layer, hs in _by_layer(heads))


def _or(value: Any, fallback: str) -> str:
    return fallback if value in (None, "") else str(value)


def _body(
    m: ModelEntry, configs: dict[str, ConfigStats], coverage: dict[str, int], names: list[str], *,
    hub_repo: str | None, hub_branch: str | None,
) -> str:
    pre_rope = bool(m.capture.get("capture_pre_rope"))
    stage = "Pre-RoPE (before rotary embedding)" if pre_rope else "Post-RoPE (as the attention kernel receives them)"
    src = m.source_dataset
    sampler = m.sampler
    precision = m.precision
    lines = [
        f"# Query/key vectors of `{m.name}`",
        "",
        f"{stage} query and key vectors captured by qkcore from `{m.name}` "
        f"({_or(m.revision, 'default revision')}). One config per (layer, head, kind): `lXXhYYq` holds the "
        "queries of layer XX, query head YY; `lXXhYYk` the keys of layer XX, key/value head YY.",
        "",
        f"Coverage: {coverage['layers']} layers, {coverage['query_head_configs']} query-head configs, "
        f"{coverage['key_head_configs']} key-head configs, {coverage['rows']:,} rows.",
        "",
        "## Model",
        "",
        f"- Type `{m.model_type}`, handled by plugin `{m.plugin}`; {m.num_layers} layers, {m.num_query_heads} query "
        f"heads, {m.num_key_value_heads} key/value heads, head_dim {m.head_dim}",
        *([f"- Weights: `{_inline(m.weights)}`"] if m.weights else []),
        *([f"- Precision: {_pairs(precision, _PRECISION_WORDS)}"] if precision else []),
        *([f"- Precision note: {precision['note']}"] if precision.get("note") else []),
        f"- Tokenizer: `{_or(m.tokenizer.get('name'), m.name)}` ({_or(m.tokenizer.get('revision'), 'default revision')})"
        + (f", max_length {m.tokenizer['max_length']}" if m.tokenizer.get("max_length") else ""),
    ]
    nope = [k for k, v in _by_layer(m.rope_layers) if v is False]
    sliding = {k: m.sliding_windows.get(k) for k, v in _by_layer(m.layer_kinds) if v == "sliding"}
    if nope:
        lines.append(f"- NoPE layers (no rotary embedding; post-RoPE equals pre-RoPE there): {nope}")
    if sliding:
        lines.append(f"- Sliding-window layers (layer: window): {sliding}")
    lines += [f"- {note}" for note in m.notes]
    lines += [
        "",
        "## Capture",
        "",
        f"- Documents: {m.documents:,} from `{src.get('path')}`"
        + (f" (config `{src['name']}`)" if src.get("name") else "")
        + f", split `{src.get('split')}`, text column `{src.get('text_column')}`, "
        + (f"id column `{src['id_column']}`" if src.get("id_column") else "ids are row indices")
        + (f", first {src['max_samples']:,} rows" if src.get("max_samples") else "")
        + f"; {m.tokens:,} tokens",
    ]
    if m.skipped_documents:
        lines.append(f"- {m.skipped_documents:,} documents had no tokens (empty text) and are not in the data")
    lines += [
        f"- Sampler: {_sampler_words(sampler)}",
        f"- Head selection: {_or(m.head_selection, _inline(m.capture.get('head_sampling')))}",
        f"- Query heads: {_heads_summary(m.selected_heads)}",
        f"- Key heads: {_heads_summary(m.key_heads)}",
        f"- Capture settings: `{_inline(m.capture)}`",
        f"- Example ids: {m.example_id_rule}",
        f"- qkcore {m.qkcore_version}"
        + "".join(f", {lib} {m.versions[lib]}" for lib in ("torch", "transformers") if m.versions.get(lib))
        + (f"; run `{m.run_key}`" if m.run_key else "") + f", created {m.created}",
    ]
    if m.nonfinite_rows:
        bad = {n: s.nonfinite_rows for n, s in configs.items() if s.nonfinite_rows}
        lines.append(
            f"- **Warning: {m.nonfinite_rows:,} rows hold a NaN or an infinity** (per config: {_inline(bad)}); "
            "usually a float16 overflow: use bfloat16 or float32"
        )
    lines += ["", "Rows per bucket (summed over configs):", "", *_bucket_table(configs), ""]
    first = names[0] if names else "l00h00q"
    repo = hub_repo or "<user>/<repo>"
    branch = hub_branch or "<branch>"
    lines += [
        "## Schema",
        "",
        "Each `lXXhYY[qk]/data.parquet` (zstd) is sorted by (`example_id`, then the 64-bit id, then `position`). "
        "`qkcore.json` lists every config's rows, rows per bucket, non-finite rows and sha256.",
        "",
        "| column | type | meaning |",
        "|---|---|---|",
        *(f"| `{column}` | {kind} | {meaning} |"
          for column, kind, meaning in schema_table(bool(m.capture.get("capture_token_strings")), pre_rope)),
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{repo}", "{first}", revision="{branch}", split="train")  # from the Hub',
        f'ds = load_dataset("path/to/data_root", "{first}", split="train")  # a local copy',
        "```",
        "",
    ]
    return "\n".join(lines)


_PRECISION_WORDS = {
    "requested_dtype": "model.dtype", "dtype": "ran in", "attn_implementation": "attention", "device": "device",
    "autocast": "autocast", "batch_size": "batch size",
    "tensor_parallel_size": "tensor parallel size", "world_size": "torchrun processes",  # issue 19
}


def _pairs(values: dict[str, Any], words: dict[str, str]) -> str:
    """``word `value`, ...`` for the keys of ``words`` that ``values`` holds (a missing autocast reads "off")."""
    parts = []
    for key, word in words.items():
        if key in values:
            value = values[key]
            parts.append(f"{word} {value}" if isinstance(value, int) else f"{word} `{_or(value, 'off')}`")
    return ", ".join(parts)


def _sampler_words(sampler: dict[str, Any]) -> str:
    kind = sampler.get("type")
    words = f"`{kind}`"
    if kind == "log_uniform":
        words += " (sniff-qk calls it `log`)"
    words += f", base_rate {sampler.get('base_rate')}, min_bucket_size {sampler.get('min_bucket_size')}"
    effective = sampler.get("effective_min_bucket_size")
    if effective is not None and effective != sampler.get("min_bucket_size"):
        words += f" (effective {effective}: the power of two used)"
    return words + f"; {sampler.get('p_keep')}"


def _bucket_table(configs: dict[str, ConfigStats]) -> list[str]:
    q_counts: Counter[int] = Counter()
    k_counts: Counter[int] = Counter()
    for name, stats in configs.items():
        parsed = parse_config_name(name)
        if parsed:
            (q_counts if parsed[2] == "q" else k_counts).update(stats.bucket_counts)
    if not q_counts and not k_counts:
        return ["No rows were captured."]
    lines = ["| bucket | query rows | key rows |", "|---:|---:|---:|"]
    for b in sorted(set(q_counts) | set(k_counts)):
        lines.append(f"| {b} | {q_counts.get(b, 0):,} | {k_counts.get(b, 0):,} |")
    return lines
