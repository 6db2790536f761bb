"""``qkcore plasticity``: attention plasticity per query head and query bucket.

For each captured query head (with its GQA key head) and each query bucket
``t``, queries are modelled as ``N(mu_t, Sigma_t)`` (:mod:`.gaussian`), key
pairs are drawn causally from single examples (:mod:`.pairs`), and the
head-bucket plasticity is the mean closed-form ``AP = 4 p (1 - p)`` over the
pairs. Work is split by key head: one task loads one key file and then its
query files one at a time, so a worker's memory is bounded by one key head
plus one query head.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from tqdm import tqdm

from qkcore import hookimpl
from qkcore.analysis.data import (
    HeadData,
    LocalSource,
    ModelMeta,
    Source,
    card_models,
    default_key_head,
    head_config,
    open_source,
    parse_card,
    parse_config,
)
from qkcore.analysis.gaussian import fit_query_model, pair_plasticity
from qkcore.analysis.pairs import DEFAULT_LOCALITY, KeyIndex, eligible_keys, sample_key_pairs
from qkcore.analysis.report import BucketResult, HeadMetrics, head_metrics, plot_plasticity, write_csv

__all__ = [
    "KeyGroup",
    "PlasticityAnalysis",
    "PlasticityConfig",
    "PlasticityError",
    "analyze_key_group",
    "plan_key_groups",
    "qkcore_analyses",
    "run_plasticity",
]

log = structlog.get_logger(__name__)

BUCKETS_CSV = "head_bucket_plasticity.csv"
HEADS_CSV = "head_metrics.csv"
PLOT_PNG = "plasticity.png"


class PlasticityError(Exception):
    """A user-facing problem with the input (missing metadata, bad dataset)."""


@dataclass(frozen=True)
class PlasticityConfig:
    """Knobs of the estimate; everything that affects the numbers."""

    seed: int = 0
    pairs_per_bucket: int = 2048
    min_queries: int = 2
    locality: float = DEFAULT_LOCALITY


@dataclass(frozen=True)
class KeyGroup:
    """One key head and the captured query heads that attend with it."""

    layer: int
    k_head: int
    q_heads: tuple[int, ...]
    has_keys: bool
    card_window: int | None


def _bucket_rng(config: PlasticityConfig, layer: int, k_head: int, bucket: int) -> np.random.Generator:
    # Keyed by (layer, key head, bucket): results do not depend on worker
    # scheduling, and query heads sharing a key head draw the same pairs
    # (unless a sliding window gives them different bucket starts).
    return np.random.default_rng([config.seed, layer, k_head, bucket])


def analyze_key_group(source: Source, group: KeyGroup, config: PlasticityConfig) -> tuple[list[BucketResult], dict[int, int | None]]:
    """Plasticity rows for every query head of ``group``, plus each head's sliding window."""
    keys = source.read(group.layer, group.k_head, "k") if group.has_keys else None
    index = KeyIndex.build(keys.bucket, keys.example_id, keys.position) if keys is not None else None
    rows: list[BucketResult] = []
    windows: dict[int, int | None] = {}
    for q_head in group.q_heads:
        queries = source.read(group.layer, q_head, "q")
        if queries is None:
            continue
        window = queries.sliding_window if queries.sliding_window is not None else group.card_window
        windows[q_head] = window
        for bucket in np.unique(queries.bucket).tolist():
            rows.append(_bucket_result(group, q_head, int(bucket), queries, keys, index, window, config))
    return rows, windows


def _bucket_result(
    group: KeyGroup,
    q_head: int,
    bucket: int,
    queries: HeadData,
    keys: HeadData | None,
    index: KeyIndex | None,
    window: int | None,
    config: PlasticityConfig,
) -> BucketResult:
    """Plasticity of one (query head, bucket), or NaN with the reason it is undefined."""
    in_bucket = queries.bucket == bucket
    n_queries = int(in_bucket.sum())
    nan = lambda reason: BucketResult(group.layer, q_head, group.k_head, bucket, n_queries, 0, math.nan, reason)  # noqa: E731
    if keys is None or index is None:
        return nan("key head not captured")
    # Earliest captured position of the bucket: the widest sliding window reach.
    starts = [int(queries.position[in_bucket].min())]
    if (index.bucket == bucket).any():
        starts.append(int(index.position[index.bucket == bucket].min()))
    start = min(starts)
    rng = _bucket_rng(config, group.layer, group.k_head, bucket)
    pairs = sample_key_pairs(
        index, bucket, config.pairs_per_bucket, rng, window=window, bucket_start=start, locality=config.locality
    )
    if pairs.shape[0] == 0:
        has_any = bool(eligible_keys(index, bucket, window, start).any())
        return nan("no eligible key pairs" if has_any else "no eligible keys")
    if n_queries < config.min_queries:
        return nan("too few queries")
    model = fit_query_model(queries.vectors[in_bucket])
    ap = pair_plasticity(keys.vectors[pairs[:, 0]], keys.vectors[pairs[:, 1]], model.mean, model.cov)
    return BucketResult(group.layer, q_head, group.k_head, bucket, n_queries, int(pairs.shape[0]), float(ap.mean()))


def plan_key_groups(configs: list[str], meta: ModelMeta, num_q_heads: int | None, num_kv_heads: int | None) -> list[KeyGroup]:
    """Group captured query heads by their GQA key head.

    Head counts come from the flags, else the card. Inferring them from the
    largest captured index is unreliable when heads were sampled, so with
    neither available this raises :class:`PlasticityError`.
    """
    n_q = num_q_heads if num_q_heads is not None else meta.num_query_heads
    n_kv = num_kv_heads if num_kv_heads is not None else meta.num_key_value_heads
    if n_q is None or n_kv is None:
        raise PlasticityError(
            "cannot map query heads to key heads: the dataset card has no qkcore.models entry with "
            "num_query_heads/num_key_value_heads; pass --num-q-heads and --num-kv-heads"
        )
    parsed = [p for p in map(parse_config, configs) if p is not None]
    q_heads = sorted((layer, head) for layer, head, kind in parsed if kind == "q")
    k_heads = {(layer, head) for layer, head, kind in parsed if kind == "k"}
    if not q_heads:
        raise PlasticityError("no captured query heads (lXXhYYq) found")
    grouped: dict[tuple[int, int], list[int]] = {}
    for layer, q in q_heads:
        if q >= n_q:
            raise PlasticityError(f"{head_config(layer, q, 'q')} exceeds num_query_heads={n_q}")
        try:
            k = default_key_head(q, n_q, n_kv)
        except ValueError as exc:
            raise PlasticityError(str(exc)) from exc
        grouped.setdefault((layer, k), []).append(q)
    return [
        KeyGroup(layer, k, tuple(qs), (layer, k) in k_heads, meta.window_for(layer))
        for (layer, k), qs in sorted(grouped.items())
    ]


def _run_groups(
    source: Source, groups: list[KeyGroup], config: PlasticityConfig, workers: int, progress: bool
) -> tuple[list[BucketResult], dict[tuple[int, int], int | None]]:
    """Run every group, in worker processes when ``workers > 1``."""
    rows: list[BucketResult] = []
    windows: dict[tuple[int, int], int | None] = {}
    bar = tqdm(total=sum(len(g.q_heads) for g in groups), desc="plasticity", unit="head", disable=not progress)

    def collect(group: KeyGroup, result: tuple[list[BucketResult], dict[int, int | None]]) -> None:
        rows.extend(result[0])
        windows.update({(group.layer, q): w for q, w in result[1].items()})
        bar.update(len(group.q_heads))

    with bar:
        if workers <= 1 or len(groups) <= 1:
            for g in groups:
                collect(g, analyze_key_group(source, g, config))
        else:
            # spawn: forking a process that may hold BLAS/torch thread pools can deadlock.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(groups)), mp_context=ctx) as pool:
                futures = {pool.submit(analyze_key_group, source, g, config): g for g in groups}
                for fut in as_completed(futures):
                    collect(futures[fut], fut.result())
    rows.sort(key=lambda r: (r.layer, r.q_head, r.bucket))
    return rows, windows


def run_plasticity(
    source: Source,
    out_dir: Path,
    config: PlasticityConfig = PlasticityConfig(),
    *,
    workers: int = 1,
    num_q_heads: int | None = None,
    num_kv_heads: int | None = None,
    model_index: int = 0,
    progress: bool = True,
    title: str = "attention plasticity",
) -> tuple[list[BucketResult], list[HeadMetrics]]:
    """Compute plasticity for every captured query head and write CSVs and the plot to ``out_dir``."""
    models = card_models(parse_card(source.card()))
    if models and not 0 <= model_index < len(models):
        raise PlasticityError(f"--model-index {model_index} out of range: the card lists {len(models)} model(s)")
    meta = ModelMeta.from_card_entry(models[model_index]) if models else ModelMeta()
    if len(models) > 1:
        log.warning("card lists several models; using one", model_index=model_index, count=len(models))
    groups = plan_key_groups(source.configs(), meta, num_q_heads, num_kv_heads)
    for g in groups:
        if not g.has_keys:
            log.warning("key head not captured", config=head_config(g.layer, g.k_head, "k"))
    rows, windows = _run_groups(source, groups, config, workers, progress)
    nope = {layer: not applies for layer, applies in meta.rope_layers.items()}
    heads = head_metrics(rows, nope, windows)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / BUCKETS_CSV, rows, BucketResult)
    write_csv(out_dir / HEADS_CSV, heads, HeadMetrics)
    plot_plasticity(out_dir / PLOT_PNG, rows, title)
    return rows, heads


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text}")
    return value


class PlasticityAnalysis:
    """The ``plasticity`` analysis (see the module docstring)."""

    name = "plasticity"
    help = "Attention plasticity per query head and position bucket of a captured Q/K dataset."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Declare ``DATA_ROOT_OR_HUB_REPO`` and the estimate's options."""
        parser.add_argument("data", metavar="DATA_ROOT_OR_HUB_REPO", help="dataset folder, or a Hub dataset repo id")
        parser.add_argument("--revision", default=None, help="Hub branch/revision (one model per branch)")
        parser.add_argument("--out", type=Path, default=None, help="output folder (default: DATA_ROOT/plasticity, or ./plasticity for a Hub repo)")
        parser.add_argument("--seed", type=_non_negative_int, default=0, help="pair-sampling seed (default: 0)")
        parser.add_argument("--pairs-per-bucket", type=_positive_int, default=2048, help="key pairs per query bucket (default: 2048)")
        parser.add_argument("--min-queries", type=_positive_int, default=2, help="fewest queries for a bucket's Gaussian (default: 2, at least 2 used)")
        parser.add_argument("--locality", type=_fraction, default=DEFAULT_LOCALITY, help="neighbour bound as a fraction of the example's captured length (default: 0.05)")
        parser.add_argument("--workers", type=_positive_int, default=min(4, os.cpu_count() or 1), help="worker processes (default: min(4, cpus))")
        parser.add_argument("--num-q-heads", type=_positive_int, default=None, help="query heads per layer (overrides the card)")
        parser.add_argument("--num-kv-heads", type=_positive_int, default=None, help="key/value heads per layer (overrides the card)")
        parser.add_argument("--model-index", type=_non_negative_int, default=0, help="which qkcore.models card entry to use (default: 0)")
        parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    def run(self, args: argparse.Namespace) -> int:
        """Run on ``args.data``; print a one-line summary, return 0 (or 2 on bad input)."""
        source = open_source(args.data, args.revision)
        out = args.out
        if out is None:
            out = source.root / "plasticity" if isinstance(source, LocalSource) else Path("plasticity")
        title = source.root.name if isinstance(source, LocalSource) else f"{source.repo}@{source.revision or 'main'}"
        config = PlasticityConfig(args.seed, args.pairs_per_bucket, max(args.min_queries, 2), args.locality)
        try:
            rows, heads = run_plasticity(
                source,
                Path(out),
                config,
                workers=args.workers,
                num_q_heads=args.num_q_heads,
                num_kv_heads=args.num_kv_heads,
                model_index=args.model_index,
                progress=not args.no_progress,
                title=f"attention plasticity: {title}",
            )
        except PlasticityError as exc:
            print(f"qkcore plasticity: error: {exc}", file=sys.stderr)
            return 2
        valid = sum(not math.isnan(r.plasticity) for r in rows)
        print(f"plasticity: {len(heads)} heads, {valid}/{len(rows)} head-buckets defined -> {out}")
        return 0


@hookimpl
def qkcore_analyses() -> dict[str, PlasticityAnalysis]:
    """Register the ``plasticity`` analysis."""
    return {"plasticity": PlasticityAnalysis()}
