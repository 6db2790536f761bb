"""The estimates behind ``qkcore plan``: what a capture would write and cost, before spending GPU hours.

The model is built from its architecture config on PyTorch's ``meta`` device
(no weights are read or allocated), so the family plugin's hooks and
:func:`qkcore.stages.plan.plan_capture` pick exactly the layers and heads a real run
would. From the sampler's keep probabilities the plan derives the expected rows
per config, the disk size and the free disk a run needs while writing
(:func:`disk_needed_bytes`), and a GPU-time estimate from
:data:`THROUGHPUT_TOKENS_PER_S`.

Document lengths: for a local dataset the documents are counted and tokenised
with the run's tokenizer (up to :data:`LENGTH_SAMPLE` of them, evenly spaced,
scaled to the count); for a Hub dataset every document is assumed
``tokenizer.max_length`` tokens long, ``dataset.max_samples`` of them (or
``--documents N``, default :data:`DEFAULT_DOCUMENTS`). ``--lengths`` gives
explicit token counts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from torch import nn

from qkcore.config import SniffConfig
from qkcore.errors import QkcoreError
from qkcore.heads import _ranges
from qkcore.plugins import Family, installed_summary, make_plugin_manager, resolve_family
from qkcore.capture import CapturePlan
from qkcore.samplers import Sampler
from qkcore.stages.plan import build_sampler, plan_capture
from qkcore.plan_defaults import DEFAULT_DOCUMENTS, LENGTH_SAMPLE
from qkcore.batching import tokenize_batches
from qkcore.layout import config_name, row_bytes
from qkcore.meta_model import on_meta_device
from qkcore.sources.documents import check_columns, document_count, iter_documents, open_dataset
from qkcore.sources.model import load_architecture
from qkcore.sources.tokenizer import load_tokenizer

__all__ = [
    "DEFAULT_DOCUMENTS",
    "DISK_WARNING_BYTES",
    "LENGTH_SAMPLE",
    "THROUGHPUT_SOURCE",
    "THROUGHPUT_TOKENS_PER_S",
    "DiskEstimate",
    "LayerPlan",
    "Plan",
    "build_meta_model",
    "disk_needed_bytes",
    "estimate_device",
    "estimate_disk",
    "estimate_gpu_seconds",
    "expected_rows",
    "format_plan",
    "make_plan",
    "non_embedding_parameters",
    "row_bytes",
    "throughput_tokens_per_s",
]

#: A plan whose estimated disk size exceeds this (1 TB, decimal) is flagged.
DISK_WARNING_BYTES = 1e12
#: Disk a run writes, measured with benchmarks/staging_disk.py (2026-11-24, pyarrow 26; see
#: docs/benchmarks.md): zstd bytes per vector element by the dtype the vectors were computed in
#: (float32 is taken as incompressible, an upper bound: real float32 rows compress ~6 %), plus
#: bytes per row for the integer columns, in the final Parquet files and in the staging parts,
#: and a fixed cost per config in every staging part (one record batch and index entry).
VECTOR_ELEMENT_BYTES = {"float32": 4.0, "float16": 2.7, "bfloat16": 2.1}
FINAL_ROW_EXTRA_BYTES = 2.0
PART_ROW_EXTRA_BYTES = 4.0
PART_BYTES_PER_CONFIG_SPILL = 1000.0

#: Throughput (tokens/s) of a *bare* forward, no qkcore capture: the baseline figures recorded
#: on 2026-11-23 for a Qwen3-8B-shaped backbone, bf16, sdpa, on one H100. Keyed by (device,
#: reference non-embedding parameter count), then by sequence length in tokens. Other models
#: scale linearly with their parameter count (time ∝ parameters); other lengths are
#: interpolated log-log (see :func:`throughput_tokens_per_s`). Capture overhead is not in
#: them (its GPU target is <= 3 %; docs/benchmarks.md). 6,946,075,648 is Qwen3-8B's
#: non-embedding parameter count as :func:`non_embedding_parameters` counts it.
THROUGHPUT_TOKENS_PER_S: dict[tuple[str, float], dict[int, float]] = {
    ("h100", 6_946_075_648.0): {4_096: 29_000.0, 32_768: 21_000.0, 131_072: 10_000.0},
}
#: Where the table's numbers come from (printed with every estimate).
THROUGHPUT_SOURCE = (
    "2026-11-23 baseline throughput of a bare forward (no capture) of a Qwen3-8B-shaped "
    "backbone, bf16, sdpa, on one H100 (29k tok/s at 4k, 21k at 32k, 10k at 128k tokens)"
)


@dataclass(frozen=True)
class LayerPlan:
    """One attention layer: what it is and what would be captured from it."""

    index: int
    kind: str  # full / sliding / cross
    sliding_window: int | None
    applies_rope: bool  # False on NoPE layers
    eligible: bool  # passes capture.layers / heads / full_attention_only (and is not cross-attention)
    head_dim: int
    query_heads: list[int]  # captured query heads (empty if none)
    key_heads: list[int]  # captured key heads, derived through the family's GQA mapping


@dataclass
class Plan:
    """What a run of one config would capture and cost (all row counts are expectations)."""

    source: str
    model_name: str
    model_type: str
    plugin: str
    non_embedding_params: int
    sampler: dict[str, Any]
    documents: int
    tokens: int
    lengths_note: str  # how the document lengths were chosen
    layers: list[LayerPlan]
    heads: dict[tuple[int, str], list[int]]  # (layer, "q"|"k") -> heads, as in CapturePlan
    rows_per_config: dict[str, float]  # config name -> expected rows
    total_rows: float
    disk_bytes: float  # uncompressed estimate, see row_bytes()
    disk_needed_bytes: float  # free disk while writing: staging parts + final files, see disk_needed_bytes()
    gpu_seconds: float | None  # estimate for one H100, see THROUGHPUT_SOURCE; None: no figures for the device
    throughput_note: str
    local_accelerator: str | None = None  # the GPU of the machine that planned, None without one
    warnings: list[str] = field(default_factory=list)
    head_selection: str = ""  # CapturePlan.head_selection
    head_selection_note: str | None = None  # CapturePlan.head_selection_note (how to match the original tool)
    device_map: Any = "auto"  # model.device_map: which device the estimate is for


# --------------------------------------------------------------------------- estimates


#: Document token counts: a sequence of lengths, or a mapping ``{length: number of documents}``
#: (a number of documents may be fractional: a sample scaled to the whole dataset).
Lengths = Sequence[int] | Mapping[int, float]


def _histogram(lengths: Lengths) -> dict[int, float]:
    """``{length: documents}`` for the positive lengths; rejects negative ones."""
    counts: Counter[int] = Counter()
    items = lengths.items() if isinstance(lengths, Mapping) else ((n, 1) for n in lengths)
    for length, count in items:
        length = int(length)
        if length < 0 or count < 0:
            raise QkcoreError(f"document lengths and counts must be >= 0, got {count} × {length}")
        if length and count:
            counts[length] += count
    return dict(counts)


def expected_rows(sampler: Sampler, lengths: Lengths) -> float:
    """Expected kept positions over documents of the given token ``lengths``.

    A document of length ``L`` keeps ``sum(p_keep(p) for p < L)`` positions in
    expectation; one mask per (example, layer, kind) is shared by every head, so
    this is also the expected row count of each config.
    """
    histogram = _histogram(lengths)
    if not histogram:
        return 0.0
    positions = torch.arange(max(histogram), dtype=torch.int64)
    cumulative = torch.cumsum(sampler.keep_probability(positions).to(torch.float64), dim=0)
    return sum(count * float(cumulative[length - 1]) for length, count in histogram.items())


@dataclass(frozen=True)
class DiskEstimate:
    """The disk one run takes: expected rows per config, their uncompressed size, the free disk needed while writing."""

    rows_per_config: dict[str, float]
    uncompressed_bytes: float  # rows × row_bytes(head_dim)
    needed_bytes: float  # staging parts + final files, see disk_needed_bytes()


def estimate_disk(
    capture_plan: CapturePlan, sampler: Sampler, lengths: Lengths, *, documents: int, batch_size: int, vector_dtype: str
) -> DiskEstimate:
    """**The** disk estimate of a run: ``qkcore plan`` prints it, ``qkcore sniff`` warns with it.

    ``lengths``: the documents' token counts; ``documents``: how many there are (one
    commit, so one spill, per batch at most); ``vector_dtype``: the dtype the vectors
    are computed in (the run knows it; the plan assumes the widest, :func:`_vector_dtype`).
    """
    per_config = expected_rows(sampler, lengths)
    rows: dict[str, float] = {}
    head_dims: dict[str, int] = {}
    for (index, kind), heads in sorted(capture_plan.heads.items()):
        for head in heads:
            name = config_name(index, head, kind)
            rows[name], head_dims[name] = per_config, capture_plan.layers[index].head_dim
    uncompressed = sum(count * row_bytes(head_dims[name]) for name, count in rows.items())
    spills = math.ceil(documents / batch_size)  # at most one commit (spill) per batch; flush spills are large
    needed = disk_needed_bytes(rows, head_dims, vector_dtype=vector_dtype, spills=spills)
    return DiskEstimate(rows, uncompressed, needed)


def disk_needed_bytes(
    rows_per_config: Mapping[str, float],
    head_dims: Mapping[str, int] | int,
    *,
    vector_dtype: str = "float32",
    spills: int = 1,
) -> float:
    """Free disk a run needs at its peak: its staging parts plus its final Parquet files.

    A run spills rows into zstd parts under ``.qkcore/staging/`` (at every commit and
    whenever its buffer passes ``output.flush_threshold_mb``); ``write_final_files()`` writes
    every final file before the parts are removed, so both exist at once. Parts cost
    about what the finals do per row (measured ratio 1.00-1.07 at head_dim 8-128 with
    large spills), plus :data:`PART_BYTES_PER_CONFIG_SPILL` per config and spill: many
    small spills of few rows each make parts several times the finals (3.3x seen at
    head_dim 8 with a commit after every batch).

    ``head_dims`` maps config names to head_dim (or is one head_dim for all);
    ``vector_dtype`` is the dtype the vectors are computed in (float32 is the upper
    bound); ``spills`` bounds the number of parts (one commit per batch at most,
    plus one per flush threshold of rows).
    """
    element = VECTOR_ELEMENT_BYTES.get(vector_dtype, VECTOR_ELEMENT_BYTES["float32"])
    finals = parts = 0.0
    for name, rows in rows_per_config.items():
        head_dim = head_dims if isinstance(head_dims, int) else head_dims[name]
        finals += rows * (element * head_dim + FINAL_ROW_EXTRA_BYTES)
        parts += rows * (element * head_dim + PART_ROW_EXTRA_BYTES)
    parts += max(1, spills) * len(rows_per_config) * PART_BYTES_PER_CONFIG_SPILL
    return finals + parts


def _vector_dtype(cfg: SniffConfig) -> str:
    """The widest dtype the captured vectors may be computed in (float32 unless the model is 16-bit)."""
    model = cfg.model.dtype
    if model not in VECTOR_ELEMENT_BYTES or model == "float32":
        return "float32"  # float32 or auto: assume the widest
    autocast = cfg.inference.autocast_dtype  # applies on CUDA when it differs from the model's
    candidates = [model] + ([autocast] if autocast in VECTOR_ELEMENT_BYTES else ["float32"])
    return max(candidates, key=VECTOR_ELEMENT_BYTES.__getitem__)


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` outside its input embeddings and LM head (works on meta tensors)."""
    skip: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            skip.update(id(p) for p in module.parameters())
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if id(parameter) in skip or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
    return total


def throughput_tokens_per_s(params: float, seq_len: int, device: str = "h100") -> float:
    """Estimated tokens/s for a model of ``params`` non-embedding parameters at ``seq_len`` tokens.

    Uses the table entry for ``device`` whose reference size is closest (log scale),
    scales by ``reference / params``, and interpolates log-log in sequence length
    (held flat below the shortest measured length, extrapolated along the last
    segment above the longest).
    """
    entries = [(ref, table) for (dev, ref), table in THROUGHPUT_TOKENS_PER_S.items() if dev == device]
    if not entries:
        raise QkcoreError(f"no throughput measurements for device '{device}'")
    params = max(float(params), 1.0)
    reference, table = min(entries, key=lambda e: abs(math.log(e[0] / params)))
    points = sorted(table.items())
    x = math.log(max(seq_len, 1))
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(v) for _, v in points]
    if len(points) == 1 or x <= xs[0]:
        log_rate = ys[0]
    else:
        i = next((j for j in range(1, len(xs)) if x <= xs[j]), len(xs) - 1)
        slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        log_rate = ys[i - 1] + slope * (x - xs[i - 1])
    return math.exp(log_rate) * reference / params


def estimate_device(device_map: Any) -> str | None:
    """The device of :data:`THROUGHPUT_TOKENS_PER_S` a run with ``model.device_map`` is estimated for.

    A CUDA device (or ``auto``, which picks CUDA where there is one) gets the H100 figures;
    the CPU and Apple GPUs have none, so no estimate (None) rather than an H100's.
    """
    text = str(device_map if not isinstance(device_map, dict) else next(iter(device_map.values()), "auto"))
    kind = text.strip().lower().partition(":")[0]
    return None if kind in ("cpu", "mps") else "h100"


def estimate_gpu_seconds(params: float, lengths: Lengths, device: str = "h100") -> float:
    """Estimated GPU seconds to run documents of the given ``lengths`` through the model."""
    return sum(
        count * length / throughput_tokens_per_s(params, length, device)
        for length, count in _histogram(lengths).items()
    )


# --------------------------------------------------------------------------- planning


def offline_architecture_hint(cfg: SniffConfig) -> str | None:
    """For a Hub model whose config could not be read: how to plan without the Hub (``--set model.config=...``).

    Names the protocol's architecture file for the model when there is one (``configs/architectures/``
    beside the config's folder, or under the working directory); None for a model that is not a Hub id.
    """
    name = cfg.model.name
    if cfg.model.config is not None or cfg.model.gguf_file or not name or Path(name).expanduser().is_dir():
        return None
    file = f"{name.replace('/', '--')}.json"
    folders = [Path("configs") / "architectures"]
    if cfg.source is not None:
        folders.insert(0, Path(cfg.source).parent.parent / "architectures")
    for folder in folders:
        if (folder / file).is_file():
            path = folder / file
            shown = os.path.relpath(path) if path.is_absolute() and Path.cwd() in path.parents else str(path)
            return f"to plan without the Hub, give the architecture: --set model.config={shown}"
    return ("to plan without the Hub, give the architecture: --set model.config=PATH (the model's config.json; "
            "configs/architectures/ holds those of the protocol's models)")


def build_meta_model(cfg: SniffConfig, pm: pluggy.PluginManager) -> tuple[nn.Module, Family]:
    """The configured model built on the ``meta`` device (shapes only, no weights) and its family.

    Built by :func:`qkcore.meta_model.on_meta_device` (see there for the attention fallback).
    """
    try:
        config = load_architecture(cfg.model)
    except QkcoreError as exc:
        hint = offline_architecture_hint(cfg)
        if hint is None:
            raise
        raise QkcoreError(f"{exc}; {hint}") from exc
    family = resolve_family(pm, config.model_type)
    model = on_meta_device(
        config, family, attn_implementation=cfg.model.attn_implementation, trust_remote_code=cfg.model.trust_remote_code
    )
    return model, family


def _document_lengths(
    cfg: SniffConfig, documents: int | None, lengths: Sequence[int] | None, sample: int = LENGTH_SAMPLE
) -> tuple[dict[int, float], int, str, list[str]]:
    """``{length: documents}``, the number of documents, a sentence saying where they came from, warnings."""
    max_length = cfg.tokenizer.max_length
    if lengths is not None:
        if documents is not None:
            raise QkcoreError("give either --documents or --lengths, not both")
        given = [int(n) for n in lengths]  # >= 0: checked where the option is parsed (commands/run.py)
        clipped = [min(n, max_length) for n in given]
        note = f"{len(given)} documents with the given lengths"
        if clipped != given:
            note += f" (longer ones truncated to tokenizer.max_length={max_length})"
        return _histogram(clipped), len(given), note, []
    if documents is not None:  # >= 1: checked where the option is parsed
        count, origin = documents, "--documents"
    elif Path(cfg.dataset.path).exists():
        return _measured_lengths(cfg, sample)
    elif cfg.dataset.max_samples is not None:
        count, origin = cfg.dataset.max_samples, "dataset.max_samples"
    else:
        count, origin = DEFAULT_DOCUMENTS, "assumed for a Hub dataset, as dataset.max_samples is null; see --documents, --lengths"
    note = f"{count:,} documents ({origin}) × {max_length:,} tokens each (tokenizer.max_length; an upper bound)"
    return {max_length: count}, count, note, []


def _measured_lengths(cfg: SniffConfig, sample: int) -> tuple[dict[int, float], int, str, list[str]]:
    """Count a local dataset's documents and tokenise them (or ``sample`` (>= 1) evenly spaced ones) as the run would."""
    max_length = cfg.tokenizer.max_length
    data = open_dataset(cfg.dataset)
    check_columns(data, cfg.dataset)
    total = document_count(data, cfg.dataset)
    if total is None:  # streaming: count by reading (texts only, not tokenised)
        total = sum(1 for _ in iter_documents(data, cfg.dataset))
    if total == 0:
        return {}, 0, f"0 documents in {cfg.dataset.path} (counted)", []
    try:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    except QkcoreError as exc:
        note = f"{total:,} documents in {cfg.dataset.path} (counted) × {max_length:,} tokens each (assumed: an upper bound)"
        return {max_length: total}, total, note, [f"WARNING tokenizer: {exc}; a run would fail the same way"]
    step = -(-total // sample)  # ceil: every step-th document, at most `sample` of them
    chosen = (doc for doc in iter_documents(data, cfg.dataset) if doc.index % step == 0)
    measured = [n for batch in tokenize_batches(chosen, tokenizer, max_length=max_length, batch_size=32) for n in batch.lengths]
    read = len(range(0, total, step))
    scale = total / read  # documents with no tokens are skipped by a run, and count 0 here
    histogram = {length: count * scale for length, count in _histogram(measured).items()}
    where = f"{total:,} documents in {cfg.dataset.path} (counted)"
    if step == 1:
        note = f"{where}, every one tokenised by the run's tokenizer and truncated to tokenizer.max_length={max_length:,}"
    else:
        note = (f"{where}; lengths from {read:,} of them (one in {step:,}, scaled ×{scale:.3g}), tokenised by the "
                f"run's tokenizer and truncated to tokenizer.max_length={max_length:,}")
    return histogram, total, note, []


def make_plan(
    cfg: SniffConfig,
    pm: pluggy.PluginManager | None = None,
    documents: int | None = None,
    lengths: Sequence[int] | None = None,
    sample: int = LENGTH_SAMPLE,
) -> Plan:
    """Plan the capture ``cfg`` describes without loading weights.

    A local dataset is read and tokenised (at most ``sample`` documents) unless
    ``documents`` (>= 1) or ``lengths`` (each >= 0) say what to assume; ``qkcore plan``
    checks those ranges where it parses its options (``commands/run.py``). Raises
    :class:`~qkcore.config.ConfigError` / :class:`~qkcore.errors.QkcoreError`
    when the config is invalid (unknown sampler, bad layer filter, unknown model).
    """
    pm = pm or make_plugin_manager()
    sampler = build_sampler(pm, cfg)
    model, family = build_meta_model(cfg, pm)
    doc_lengths, n_documents, lengths_note, problems = _document_lengths(cfg, documents, lengths, sample)
    capture_plan = plan_capture(model, family, cfg, installed_summary(pm))
    layers = [
        LayerPlan(
            index=layer.index,
            kind=layer.kind,
            sliding_window=layer.sliding_window,
            applies_rope=capture_plan.rope_sites[layer.index].applies_rope,
            eligible=layer.index in capture_plan.eligible_layers,
            head_dim=layer.head_dim,
            query_heads=list(capture_plan.heads.get((layer.index, "q"), [])),
            key_heads=list(capture_plan.heads.get((layer.index, "k"), [])),
        )
        for layer in capture_plan.all_layers
    ]
    disk = estimate_disk(capture_plan, sampler, doc_lengths, documents=n_documents,
                         batch_size=cfg.inference.batch_size, vector_dtype=_vector_dtype(cfg))
    rows_per_config = disk.rows_per_config
    total_rows = len(rows_per_config) * next(iter(rows_per_config.values()), 0.0)  # one expectation per config

    params = non_embedding_parameters(model)
    device = estimate_device(cfg.model.device_map)
    gpu_seconds = None if device is None else estimate_gpu_seconds(params, doc_lengths, device)
    typical = max(doc_lengths, default=0)
    throughput_note = (
        f"from the {THROUGHPUT_SOURCE}, scaled linearly by non-embedding parameters ({params:.3g} here) "
        f"and interpolated by sequence length (~{throughput_tokens_per_s(params, max(typical, 1)):,.0f} tok/s "
        f"at {typical:,} tokens); capture overhead not included"
    )
    reference = min((ref for dev, ref in THROUGHPUT_TOKENS_PER_S if dev == "h100"), key=lambda r: abs(math.log(r / max(params, 1))))
    if params < reference / 10:
        throughput_note += "; a model this much smaller than the reference runs slower than linear scaling says"

    if disk.uncompressed_bytes > DISK_WARNING_BYTES:
        problems.append(f"WARNING: estimated disk {_bytes(disk.uncompressed_bytes)} exceeds 1 TB")
    starved = [name for name, rows in rows_per_config.items() if rows < 1]
    if not rows_per_config:
        problems.append("WARNING zero rows: no config would be written (no layer/head selected)")
    elif starved:
        problems.append(
            f"WARNING zero rows: {len(starved)} of {len(rows_per_config)} configs expect < 1 row "
            f"({starved[0]}: {rows_per_config[starved[0]]:.3g}); raise capture.sampler.base_rate or the documents"
        )

    return Plan(
        source=str(cfg.source or "<config>"),
        model_name=cfg.model.name or f"random-{family.model_type}",
        model_type=family.model_type,
        plugin=f"{family.plugin_name} {family.plugin_version}" + (" (generic fallback)" if family.is_fallback else ""),
        non_embedding_params=params,
        sampler=sampler.describe(),
        documents=n_documents,
        tokens=round(sum(length * count for length, count in doc_lengths.items())),
        lengths_note=lengths_note,
        layers=layers,
        heads=dict(capture_plan.heads),
        rows_per_config=rows_per_config,
        total_rows=total_rows,
        disk_bytes=disk.uncompressed_bytes,
        disk_needed_bytes=disk.needed_bytes,
        gpu_seconds=gpu_seconds,
        throughput_note=throughput_note,
        local_accelerator=_local_accelerator(),
        warnings=problems,
        head_selection=capture_plan.head_selection,
        head_selection_note=capture_plan.head_selection_note,
        device_map=cfg.model.device_map,
    )


def _local_accelerator() -> str | None:
    """The name of this machine's GPU, if it has one (the GPU-time estimate is for an H100 either way)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    backend = getattr(torch.backends, "mps", None)
    return "Apple GPU (MPS)" if backend is not None and backend.is_available() else None


# --------------------------------------------------------------------------- output


def _bytes(value: float) -> str:
    """Decimal units: 1 TB = 1e12 bytes."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def _rows(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.3g}"


def _duration(seconds: float) -> str:
    if seconds < 0.1:
        return "< 0.1 s"
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _gpu_time_lines(plan: Plan) -> list[str]:
    """The GPU-time estimate and its basis, or one line saying there is none for the configured device."""
    if plan.gpu_seconds is None:
        return [f"GPU time: no estimate for model.device_map {plan.device_map!r} (qkcore has throughput figures "
                "for CUDA on an H100 only)"]
    here = f"this machine has {plan.local_accelerator}" if plan.local_accelerator else "this machine has no GPU"
    return [f"GPU time: ~{_duration(plan.gpu_seconds)} on one H100: an estimate, not measured ({here})",
            f"  basis: {plan.throughput_note}"]


def format_plan(plan: Plan) -> str:
    """A plain-text report of ``plan`` for a person (warnings last, one per line)."""
    sampler = plan.sampler
    n_q = sum(len(h) for (_, kind), h in plan.heads.items() if kind == "q")
    n_k = sum(len(h) for (_, kind), h in plan.heads.items() if kind == "k")
    captured = [layer for layer in plan.layers if layer.query_heads or layer.key_heads]
    lines = [
        f"qkcore plan: {plan.source}",
        f"model: {plan.model_name} ({plan.model_type}, plugin {plan.plugin}), {len(plan.layers)} attention layers, "
        f"{plan.non_embedding_params:,} non-embedding parameters (built on the meta device; no weights loaded)",
        f"sampler: {sampler['type']} base_rate={sampler['base_rate']} min_bucket_size={sampler['min_bucket_size']} "
        f"({sampler['p_keep']})",
        f"documents: {plan.lengths_note}; {plan.tokens:,} tokens",
        "",
        f"layers ({len([l for l in plan.layers if l.eligible])} eligible, {len(captured)} captured):",
        f"  {'layer':>5}  {'kind':<7}  {'window':>7}  {'rope':<4}  {'eligible':<8}  {'query heads':<20}  key heads",
    ]
    for layer in plan.layers:
        window = str(layer.sliding_window) if layer.sliding_window else "-"
        lines.append(
            f"  {layer.index:>5}  {layer.kind:<7}  {window:>7}  {'RoPE' if layer.applies_rope else 'NoPE':<4}  "
            f"{'yes' if layer.eligible else 'no':<8}  {_ranges(layer.query_heads):<20}  {_ranges(layer.key_heads)}"
        )
    lines.append(f"head selection: {plan.head_selection}")
    if plan.head_selection_note:
        lines.append(f"NOTE: {plan.head_selection_note}")
    rows = sorted(set(plan.rows_per_config.values()))
    per_config = _rows(rows[0]) if len(rows) == 1 else f"{_rows(rows[0])} .. {_rows(rows[-1])}"
    lines += [
        "",
        f"configs: {len(plan.rows_per_config)} ({n_q} query, {n_k} key)",
        f"expected rows per config: {per_config if rows else 0}",
        f"expected rows in total: {_rows(plan.total_rows)}",
        f"disk: {_bytes(plan.disk_bytes)} (uncompressed estimate: rows × (head_dim × 4 + 16) bytes; zstd Parquet is smaller)",
        f"free disk needed while writing: {_bytes(plan.disk_needed_bytes)} (staging parts and final files "
        f"exist together until the parts are removed)",
        *_gpu_time_lines(plan),
    ]
    if plan.warnings:
        lines += ["", *plan.warnings]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command
