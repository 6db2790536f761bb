"""``qkcore inspect``: what a captured data folder holds, at a glance.

Per-config row counts, the bucket histogram, coverage (layers, query heads,
key heads, examples) and a PNG of rows per bucket, one line per layer. Only the
``bucket`` and ``example_id`` columns are read (batch by batch), never the
vectors, so it stays fast on large captures. The dataset card and the manifest are
optional: when ``README.md`` has qkcore front matter its models are named, and the
rows on disk are checked against the manifest (``qkcore.json``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from qkcore.card import card_models, card_run_key, read_front_matter
from qkcore.errors import QkcoreError
from qkcore.layout import CARD_FILE, DATA_FILE, MANIFEST_FILE, configs_in, parse_config_name
from qkcore.manifest import read_manifest

__all__ = [
    "DEFAULT_PLOT",
    "CONFIG_COLUMNS",
    "ConfigSummary",
    "Inspection",
    "format_inspection",
    "inspect_data",
    "plot_rows_per_bucket",
]

#: Default plot file name, under the data root.
DEFAULT_PLOT = "inspect.png"
#: The only columns read from each data file.
CONFIG_COLUMNS = ["bucket", "example_id"]
_CARD = "README.md"
_BATCH_ROWS = 1 << 20


@dataclass(frozen=True)
class ConfigSummary:
    """One ``lXXhYY[qk]`` config on disk."""

    name: str
    layer: int
    head: int
    kind: str  # "q" or "k"
    rows: int
    examples: int  # distinct example_id values
    bucket_counts: dict[int, int]


@dataclass
class Inspection:
    """Everything :func:`inspect_data` found under ``root``."""

    root: Path
    configs: list[ConfigSummary]
    examples: int  # distinct example_id values over all configs
    models: list[dict[str, Any]] = field(default_factory=list)  # card's qkcore.models (empty without a card)
    card_notes: list[str] = field(default_factory=list)  # missing/broken card, stats that disagree with disk

    @property
    def total_rows(self) -> int:
        return sum(c.rows for c in self.configs)

    @property
    def layers(self) -> list[int]:
        return sorted({c.layer for c in self.configs})

    @property
    def query_heads(self) -> list[tuple[int, int]]:
        """(layer, head) of every query config."""
        return [(c.layer, c.head) for c in self.configs if c.kind == "q"]

    @property
    def key_heads(self) -> list[tuple[int, int]]:
        """(layer, head) of every key config."""
        return [(c.layer, c.head) for c in self.configs if c.kind == "k"]

    def bucket_counts(self, kind: str | None = None, layer: int | None = None) -> dict[int, int]:
        """Rows per bucket summed over configs (optionally of one kind and/or layer), by bucket."""
        total: Counter[int] = Counter()
        for c in self.configs:
            if (kind is None or c.kind == kind) and (layer is None or c.layer == layer):
                total.update(c.bucket_counts)
        return dict(sorted(total.items()))


def _read_config(name: str, path: Path) -> tuple[ConfigSummary, np.ndarray]:
    """Summarise one data file; also return its sorted distinct example ids."""
    parsed = parse_config_name(name)
    assert parsed is not None  # scan_configs only returns canonical names
    layer, head, kind = parsed
    buckets: Counter[int] = Counter()
    ids: list[np.ndarray] = []
    rows = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS, columns=CONFIG_COLUMNS):
            bucket = batch.column("bucket").to_numpy(zero_copy_only=False)
            values, counts = np.unique(bucket, return_counts=True)
            buckets.update(dict(zip(values.tolist(), counts.tolist())))
            ids.append(np.unique(batch.column("example_id").to_numpy(zero_copy_only=False)))
            rows += len(bucket)
    except (OSError, KeyError, ValueError) as exc:
        raise QkcoreError(f"{path}: cannot read columns {CONFIG_COLUMNS}: {exc}") from exc
    unique_ids = np.unique(np.concatenate(ids)) if ids else np.empty(0, dtype=np.int32)
    summary = ConfigSummary(name, layer, head, kind, rows, int(len(unique_ids)), dict(sorted(buckets.items())))
    return summary, unique_ids


def _check_card(root: Path, configs: list[ConfigSummary]) -> tuple[list[dict[str, Any]], list[str]]:
    """The card's models, and notes where the card or manifest is missing, broken or disagrees with disk."""
    notes: list[str] = []
    path = root / _CARD
    models: list[dict[str, Any]] = []
    if path.is_file():
        front, _ = read_front_matter(path)
        models = card_models(front)
        if not models:
            notes.append(f"the dataset card ({_CARD}) has no qkcore front matter")
    else:
        notes.append(f"no dataset card ({_CARD}); showing what is on disk")
    try:
        manifest = read_manifest(root / MANIFEST_FILE)
    except QkcoreError as exc:
        return models, [*notes, str(exc)]
    if manifest is None:
        return models, [*notes, f"no manifest ({MANIFEST_FILE}); row counts are not checked"]
    on_disk = {c.name: c for c in configs}
    stale = sorted(n for n, c in on_disk.items() if n not in manifest.configs or manifest.configs[n].rows != c.rows)
    if stale:
        notes.append(f"{MANIFEST_FILE} disagrees with disk for {len(stale)} config(s) (e.g. {stale[0]})")
    missing = sorted(set(manifest.configs) - set(on_disk))
    if missing:
        notes.append(f"{MANIFEST_FILE} lists {len(missing)} config(s) not on disk (e.g. {missing[0]})")
    nonfinite = sum(s.nonfinite_rows for s in manifest.configs.values())
    if nonfinite:
        notes.append(f"{nonfinite} rows hold NaN or infinity (see {MANIFEST_FILE})")
    return models, notes


def inspect_data(root: str | Path) -> Inspection:
    """Summarise every ``lXXhYY[qk]/data.parquet`` under ``root`` (reading two int32 columns)."""
    root = Path(root)
    if not root.is_dir():
        raise QkcoreError(f"{root}: no such data folder")
    names = configs_in(root)
    if not names:
        raise QkcoreError(f"{root}: no lXXhYY[qk]/{DATA_FILE} configs found")
    configs: list[ConfigSummary] = []
    seen = np.empty(0, dtype=np.int64)
    for name in names:
        summary, ids = _read_config(name, root / name / DATA_FILE)
        configs.append(summary)
        # Configs of one run share their examples: skip the merge when nothing is new.
        if not (len(ids) == len(seen) and np.array_equal(ids, seen)):
            seen = np.union1d(seen, ids.astype(np.int64))
    models, notes = _check_card(root, configs)
    return Inspection(root, configs, int(len(seen)), models, notes)


def _heads_by_layer(pairs: list[tuple[int, int]]) -> str:
    by_layer: dict[int, list[int]] = {}
    for layer, head in pairs:
        by_layer.setdefault(layer, []).append(head)
    return "; ".join(f"l{layer}: {sorted(heads)}" for layer, heads in sorted(by_layer.items())) or "none"


def format_inspection(inspection: Inspection) -> str:
    """A plain-text report: models, coverage, bucket histogram and one line per config."""
    ins = inspection
    lines = [f"qkcore inspect: {ins.root}"]
    for m in ins.models:
        lines.append(
            f"model: {m.get('name')} (revision {m.get('revision') or 'default'}, {m.get('model_type')}, "
            f"{m.get('num_layers')} layers, {m.get('num_query_heads')} query / {m.get('num_key_value_heads')} kv heads, "
            f"head_dim {m.get('head_dim')}), {m.get('documents')} documents, {m.get('tokens')} tokens"
        )
    lines += [f"note: {note}" for note in ins.card_notes]
    lines += [
        f"coverage: {len(ins.layers)} layers, {len(ins.query_heads)} query heads, {len(ins.key_heads)} key heads, "
        f"{ins.examples} examples",
        f"  query heads: {_heads_by_layer(ins.query_heads)}",
        f"  key heads: {_heads_by_layer(ins.key_heads)}",
        f"rows: {ins.total_rows:,} in {len(ins.configs)} configs",
        "",
        "rows per bucket (summed over configs):",
        f"  {'bucket':>6}  {'query rows':>12}  {'key rows':>12}",
    ]
    q_counts, k_counts = ins.bucket_counts("q"), ins.bucket_counts("k")
    for bucket in sorted(set(q_counts) | set(k_counts)):
        lines.append(f"  {bucket:>6}  {q_counts.get(bucket, 0):>12,}  {k_counts.get(bucket, 0):>12,}")
    lines += ["", "configs:", f"  {'config':<10}  {'rows':>12}  {'examples':>8}  buckets"]
    for c in ins.configs:
        span = f"{min(c.bucket_counts)}..{max(c.bucket_counts)}" if c.bucket_counts else "-"
        lines.append(f"  {c.name:<10}  {c.rows:>12,}  {c.examples:>8,}  {span}")
    return "\n".join(lines)


def plot_rows_per_bucket(inspection: Inspection, path: str | Path) -> Path:
    """Write a PNG of rows per bucket, one line per layer (its query and key configs summed)."""
    # Figure + Agg canvas directly: no pyplot global state, works headless.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    fig = Figure(figsize=(9, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    layers = inspection.layers or [0]
    norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    cmap = colormaps["viridis"]
    for layer in inspection.layers:
        counts = inspection.bucket_counts(layer=layer)
        ax.plot(list(counts), list(counts.values()), marker="o", ms=3, lw=1.2, color=cmap(norm(layer)), label=f"layer {layer}")
    if len(inspection.layers) <= 12:
        ax.legend(loc="best", fontsize="small")
    else:
        cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
        cbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("bucket")
    ax.set_ylabel("rows (query + key configs of the layer)")
    ax.set_ylim(bottom=0)
    names = ", ".join(str(m.get("name")) for m in inspection.models)
    ax.set_title(f"rows per bucket: {inspection.root.name}" + (f" ({names})" if names else ""))
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The run the plot shows, in its PNG text: a root that later publishes another run removes it.
    card = inspection.root / CARD_FILE
    run_key = card_run_key(card.read_text(encoding="utf-8")) if card.is_file() else None
    fig.savefig(path, metadata={"qkcore:run_key": run_key} if run_key else None)
    return path
