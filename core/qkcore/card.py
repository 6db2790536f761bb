"""Dataset card (``README.md``) generation for a qkcore data folder.

The card's YAML front matter declares one ``datasets`` config per
``lXXhYY[qk]/data.parquet`` on disk, so ``load_dataset(data_root, "l00h00q")``
works locally and on the Hub, and records under ``qkcore:`` which models were
captured and per-config row/bucket statistics. It is regenerated from disk on
every run; model entries and unknown top-level keys of an existing card are kept.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import yaml

from qkcore.layout import DATA_FILE, config_name, parse_config_name

# ``configs`` and ``qkcore`` are rewritten on every run. ``dataset_info`` is dropped
# rather than kept: a stale one (split sizes, features) makes ``load_dataset``
# fail its verification after a rerun changes row counts.
_DROPPED_KEYS = ("dataset_info",)
# Closing fence must be a whole "---" line (so "----" inside YAML does not end it).
_FRONT_MATTER_RE = re.compile(
    r"\A---[ \t]*\r?\n(.*?)^---[ \t]*\r?$\n?", re.DOTALL | re.MULTILINE
)


@dataclass
class ModelEntry:
    """What one sniff run records about the model it captured (goes into the front matter's `qkcore.models` list)."""

    name: str  # model name / hub id
    revision: str | None
    model_type: str
    plugin: str  # plugin name + version that handled it
    num_layers: int
    num_query_heads: int
    num_key_value_heads: int
    head_dim: int
    source_dataset: dict  # path, name, split, text_column, id_column, max_samples
    sampler: dict  # sampler.describe()
    capture: dict  # capture_pre_rope, full_attention_only, layers/heads filters, head_sampling
    selected_heads: dict[int, list[int]]  # layer -> query heads
    key_heads: dict[int, list[int]]  # layer -> key heads
    key_head_of_query: dict[int, dict[int, int]]  # layer -> {query head: the key head it attends with}
    layer_kinds: dict[int, str]  # layer -> full/sliding/cross
    sliding_windows: dict[int, int | None]
    rope_layers: dict[int, bool]  # layer -> applies RoPE (False = NoPE)
    notes: list[str]  # family notes (e.g. NoPE layers, scale choices)
    example_id_rule: str  # how example ids were normalised
    documents: int
    tokens: int
    qkcore_version: str
    created: str  # ISO timestamp (caller supplies; tests pass a fixed one)


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
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def read_front_matter(readme_path: Path) -> tuple[dict, str]:
    """Return ``(front_matter, body)`` of a card; ``({}, text)`` if it has none.

    Raises ValueError naming the file when front matter is present but broken.
    """
    text = readme_path.read_text(encoding="utf-8")
    if not re.match(r"\A---[ \t]*\r?\n", text):
        return {}, text
    m = _FRONT_MATTER_RE.match(text)
    if m is None:
        raise ValueError(f"{readme_path}: front matter starts with '---' but is never closed")
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as exc:
        raise ValueError(f"{readme_path}: front matter is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{readme_path}: front matter must be a mapping, got {type(data).__name__}")
    qk = data.get("qkcore", {})
    if qk is None:
        qk = {}
    if not isinstance(qk, dict) or not isinstance(qk.get("models", []), list):
        raise ValueError(f"{readme_path}: front matter 'qkcore' / 'qkcore.models' is malformed")
    return data, text[m.end() :]


def scan_configs(data_root: Path) -> list[str]:
    """Sorted config names that have a ``data.parquet`` under ``data_root``."""
    if not data_root.is_dir():
        return []
    names = [
        p.name
        for p in data_root.iterdir()
        if p.is_dir() and parse_config_name(p.name) is not None and (p / DATA_FILE).is_file()
    ]
    # Sort by (layer, head, kind) so l100 follows l99, not l10.
    return sorted(names, key=lambda n: parse_config_name(n) or (0, 0, ""))


def config_stats(path: Path) -> dict:
    """Rows and ``{bucket: count}`` of one data file, reading only the bucket column."""
    buckets = pq.read_table(path, columns=["bucket"]).column("bucket").to_numpy()
    values, counts = np.unique(buckets, return_counts=True)
    return {
        "rows": int(len(buckets)),
        "bucket_counts": {int(v): int(c) for v, c in zip(values, counts)},
    }


def _merge_models(existing: list, new: dict | None) -> list:
    """Replace the entry with the same (name, revision) in place, else append."""
    models = [m for m in existing if isinstance(m, dict)]
    if new is None:
        return models
    key = (new["name"], new["revision"])
    for i, m in enumerate(models):
        if (m.get("name"), m.get("revision")) == key:
            models[i] = new
            return models
    return models + [new]


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def write_card(
    data_root: Path,
    readme_path: Path,
    model: ModelEntry | None = None,
    *,
    hub_repo: str | None = None,
    hub_branch: str | None = None,
) -> dict:
    """Regenerate the dataset card from what is on disk; return its front matter."""
    data_root, readme_path = Path(data_root), Path(readme_path)
    existing, _ = read_front_matter(readme_path) if readme_path.exists() else ({}, "")
    old_qk = existing.get("qkcore") or {}

    names = scan_configs(data_root)
    stats = {n: config_stats(data_root / n / DATA_FILE) for n in names}
    parsed = [parse_config_name(n) for n in names]
    coverage = {
        "layers": len({p[0] for p in parsed if p}),
        "query_head_configs": sum(1 for p in parsed if p and p[2] == "q"),
        "key_head_configs": sum(1 for p in parsed if p and p[2] == "k"),
    }
    models = _merge_models(old_qk.get("models") or [], _plain(model) if model else None)

    qk: dict = {k: v for k, v in old_qk.items() if k not in ("models", "coverage", "stats")}
    qk.update(models=models, coverage=coverage, stats=stats)
    base = readme_path.parent
    configs = [
        {
            "config_name": n,
            "data_files": [{"split": "train", "path": _rel(data_root / n / DATA_FILE, base)}],
        }
        for n in names
    ]
    # Keep unknown keys in their original order; owned keys are replaced.
    front: dict = {k: v for k, v in existing.items() if k not in _DROPPED_KEYS}
    front["configs"] = configs
    front["qkcore"] = qk

    body = render_body(front, data_root=data_root, hub_repo=hub_repo, hub_branch=hub_branch)
    text = "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n\n" + body
    readme_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = readme_path.with_name(f".{readme_path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, readme_path)  # readers never see a half-written card
    return front


def _bucket_table(qk: dict, model: dict) -> list[str]:
    """Rows per bucket summed over the configs this model selected that exist on disk."""
    stats = qk.get("stats", {})
    q_counts: Counter[int] = Counter()
    k_counts: Counter[int] = Counter()
    for kind, heads, counter in (
        ("q", model.get("selected_heads") or {}, q_counts),
        ("k", model.get("key_heads") or {}, k_counts),
    ):
        for layer, hs in heads.items():
            for h in hs:
                st = stats.get(config_name(int(layer), int(h), kind))
                if st:
                    counter.update({int(b): int(c) for b, c in st["bucket_counts"].items()})
    if not q_counts and not k_counts:
        return ["_No rows on disk for this model's selected heads._"]
    lines = ["| bucket | query rows | key rows |", "|---:|---:|---:|"]
    for b in sorted(set(q_counts) | set(k_counts)):
        lines.append(f"| {b} | {q_counts.get(b, 0)} | {k_counts.get(b, 0)} |")
    return lines


def _by_layer(mapping: dict) -> list[tuple[Any, Any]]:
    """Items sorted by numeric layer (keys may be str if a card was hand-edited)."""
    return sorted(mapping.items(), key=lambda kv: int(kv[0]))


def _inline(value: Any) -> str:
    """One-line YAML flow rendering for the markdown body."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9).strip()


def _heads_summary(heads: dict) -> str:
    if not heads:
        return "none"
    return "; ".join(f"layer {layer}: {list(hs)}" for layer, hs in _by_layer(heads))


def _model_section(qk: dict, m: dict) -> list[str]:
    src = m.get("source_dataset") or {}
    rev = m.get("revision") or "default"
    lines = [
        f"### `{m.get('name')}` (revision `{rev}`)",
        "",
        f"- Model type: `{m.get('model_type')}`, handled by plugin `{m.get('plugin')}`",
        f"- Shape: {m.get('num_layers')} layers, {m.get('num_query_heads')} query heads, "
        f"{m.get('num_key_value_heads')} key/value heads, head_dim {m.get('head_dim')}",
        f"- Source dataset: `{src.get('path')}` (name `{src.get('name')}`, split "
        f"`{src.get('split')}`, text column `{src.get('text_column')}`, id column "
        f"`{src.get('id_column')}`, max samples {src.get('max_samples')})",
        f"- Sampler: `{_inline(m.get('sampler'))}`",
        f"- Example ids: {m.get('example_id_rule')}",
        f"- Capture: `{_inline(m.get('capture'))}`",
        f"- Query heads: {_heads_summary(m.get('selected_heads') or {})}",
        f"- Key heads: {_heads_summary(m.get('key_heads') or {})}",
        f"- Documents: {m.get('documents')}, tokens: {m.get('tokens')}",
        f"- qkcore {m.get('qkcore_version')}, created {m.get('created')}",
    ]
    nope = [k for k, v in _by_layer(m.get("rope_layers") or {}) if v is False]
    sliding = {
        k: (m.get("sliding_windows") or {}).get(k)
        for k, v in _by_layer(m.get("layer_kinds") or {})
        if v == "sliding"
    }
    if nope:
        lines.append(f"- NoPE layers (no rotary embedding; post-RoPE = pre-RoPE): {nope}")
    if sliding:
        lines.append(f"- Sliding-window layers (layer: window): {sliding}")
    lines += [f"- Note: {n}" for n in m.get("notes") or []]
    lines += ["", "Bucket distribution:", "", *_bucket_table(qk, m), ""]
    return lines


def render_body(
    front: dict,
    *,
    data_root: Path,
    hub_repo: str | None = None,
    hub_branch: str | None = None,
) -> str:
    """Human-readable markdown summary of the front matter."""
    qk = front.get("qkcore", {})
    cov = qk.get("coverage", {})
    first = front["configs"][0]["config_name"] if front.get("configs") else "l00h00q"
    repo = hub_repo or "<user>/<repo>"
    branch = hub_branch or "<branch>"
    lines = [
        "# qkcore query/key capture",
        "",
        "Post-RoPE query and key vectors captured from transformer attention layers by "
        "qkcore. One config per (layer, head, kind): "
        "`lXXhYYq` holds queries of layer XX, query head YY; `lXXhYYk` holds keys of "
        "layer XX, key/value head YY.",
        "",
        f"Coverage: {cov.get('layers', 0)} layers, {cov.get('query_head_configs', 0)} query-head "
        f"configs, {cov.get('key_head_configs', 0)} key-head configs.",
        "",
        "## Models",
        "",
    ]
    models = qk.get("models") or []
    if not models:
        lines += ["_No model entries recorded._", ""]
    for m in models:
        lines += _model_section(qk, m)
    lines += [
        "## Schema",
        "",
        "Each `lXXhYY[qk]/data.parquet` (zstd) is sorted by (`example_id`, then the 64-bit id, then `position`):",
        "",
        "| column | type | meaning |",
        "|---|---|---|",
        "| `bucket` | int32 | sampler bucket of the token |",
        "| `example_id` | int32 | low 32 bits of the normalised 64-bit example id |",
        "| `position` | int32 | token position within the example |",
        "| `vector` | fixed_size_list<float32>[head_dim] | query or key (post-RoPE unless "
        "`capture_pre_rope`) |",
        "| `sliding_window` | int32, nullable | layer's sliding window; null for full attention |",
        "",
        "## Loading",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{data_root}", "{first}", split="train")  # local folder',
        f'ds = load_dataset("{repo}", "{first}", revision="{branch}", split="train")  # Hub',
        "```",
        "",
    ]
    return "\n".join(lines)
