"""``qkcore plasticity``: attention plasticity per query head and query bucket.

For each captured query head (with its GQA key head) and each query bucket
``t``, queries are modelled as ``N(mu_t, Sigma_t)`` (:mod:`.gaussian`), key
pairs are drawn causally from single examples (:mod:`.pairs`), and the
head-bucket plasticity is the mean closed-form ``AP = 4 p (1 - p)`` over the
pairs. Rows with a NaN or infinite vector are left out and counted; buckets
with at most ``head_dim`` queries are flagged and, by default, left out of the
head means and the plot. The output folder gets a README stating all of this
(:mod:`.readme`). Work is split by key head: one task loads one key file and
then its query files one at a time, so a worker's memory is bounded by one key
head plus one query head.
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import structlog
from tqdm import tqdm

from qkcore.analysis.data import (
    HeadData,
    HubSource,
    ModelMeta,
    PlasticityError,
    Source,
    read_card_models,
)
from qkcore.analysis.gaussian import fit_query_model, pair_plasticity
from qkcore.analysis.heatmap import HeatmapPanel, plot_heatmaps
from qkcore.analysis.pairs import DEFAULT_LOCALITY, KeyIndex, eligible_keys, sample_key_pairs
from qkcore.analysis.provenance import PROVENANCE_FILE, PlasticityProvenance, RunFacts
from qkcore.analysis.readme import render_readme
from qkcore.analysis.report import (
    BucketResult,
    HeadInfo,
    HeadMetrics,
    head_metrics,
    plot_plasticity,
    write_csv,
)
from qkcore import __version__
from qkcore.heads import GQA_RULE, key_head_for
from qkcore.layout import config_name, parse_config_name

__all__ = [
    "KeyGroup",
    "KeyPlan",
    "PlasticityConfig",
    "PlasticityError",
    "analyze_key_group",
    "plan_key_groups",
    "run_plasticity",
]

log = structlog.get_logger(__name__)

BUCKETS_CSV = "head_bucket_plasticity.csv"
HEADS_CSV = "head_metrics.csv"
PLOT_PNG = "plasticity.png"
HEATMAP_PNG = "heatmap.png"
README_MD = "README.md"
#: The generic GQA rule (:func:`qkcore.heads.key_head_for`), in words.
DEFAULT_RULE = GQA_RULE


@dataclass(frozen=True)
class PlasticityConfig:
    """Knobs of the estimate; everything that affects the numbers."""

    seed: int = 0
    pairs_per_bucket: int = 2048
    min_queries: int = 2
    locality: float = DEFAULT_LOCALITY
    #: Average buckets with at most head_dim queries into the head means and the plot.
    keep_small_buckets: bool = False


@dataclass(frozen=True)
class KeyGroup:
    """One key head and the captured query heads that attend with it."""

    layer: int
    k_head: int
    q_heads: tuple[int, ...]
    has_keys: bool
    card_window: int | None


@dataclass(frozen=True)
class KeyPlan:
    """The key groups, and how query heads were mapped to key heads (for the README)."""

    groups: tuple[KeyGroup, ...]
    mapping: str


def _bucket_rng(config: PlasticityConfig, layer: int, k_head: int, bucket: int) -> np.random.Generator:
    # Keyed by (layer, key head, bucket): results do not depend on worker
    # scheduling, and query heads sharing a key head draw the same pairs
    # (unless their bucket starts differ, e.g. after non-finite rows were dropped).
    return np.random.default_rng([config.seed, layer, k_head, bucket])


def _finite(data: HeadData) -> tuple[HeadData, HeadData | None]:
    """``(finite rows, non-finite rows or None)``: NaN/inf vectors are left out of every estimate."""
    ok = data.finite_rows()
    if ok.all():
        return data, None
    return data.select(ok), data.select(~ok)


def analyze_key_group(source: Source, group: KeyGroup, config: PlasticityConfig) -> tuple[list[BucketResult], list[HeadInfo]]:
    """Bucket rows and a :class:`HeadInfo` for every query head of ``group``."""
    keys: HeadData | None = None
    index: KeyIndex | None = None
    skipped_keys = 0
    key_problem = "" if group.has_keys else "key head not captured"
    if group.has_keys:
        keys, bad = _finite(source.read(group.layer, group.k_head, "k"))
        skipped_keys = len(bad) if bad is not None else 0
        index = KeyIndex.build(keys.bucket, keys.example_id, keys.position)
        if len(keys) == 0:
            key_problem = "all keys non-finite" if skipped_keys else "key head has no rows"
    rows: list[BucketResult] = []
    infos: list[HeadInfo] = []
    for q_head in group.q_heads:
        raw = source.read(group.layer, q_head, "q")
        window = raw.sliding_window if raw.sliding_window is not None else group.card_window
        head = (group.layer, q_head, group.k_head)
        if len(raw) == 0:
            rows.append(BucketResult(*head, None, 0, 0, 0, math.nan, True, "no rows"))
            infos.append(HeadInfo(*head, window, raw.head_dim, 0, skipped_keys, "no rows"))
            continue
        if keys is not None and len(keys) and raw.head_dim != keys.head_dim:
            raise PlasticityError(
                f"{config_name(group.layer, q_head, 'q')} has vectors of length {raw.head_dim} but "
                f"{config_name(group.layer, group.k_head, 'k')} of length {keys.head_dim}"
            )
        queries, bad = _finite(raw)
        skipped = np.zeros(0, dtype=np.int64) if bad is None else bad.bucket
        for bucket in np.unique(raw.bucket).tolist():
            n_skipped = int((skipped == bucket).sum())
            rows.append(
                _bucket_result(group, q_head, int(bucket), queries, n_skipped, raw.head_dim, keys, index, key_problem, window, config)
            )
        infos.append(HeadInfo(*head, window, raw.head_dim, int(skipped.size), skipped_keys, key_problem))
    return rows, infos


def _bucket_result(
    group: KeyGroup,
    q_head: int,
    bucket: int,
    queries: HeadData,
    skipped: int,
    head_dim: int,
    keys: HeadData | None,
    index: KeyIndex | None,
    key_problem: str,
    window: int | None,
    config: PlasticityConfig,
) -> BucketResult:
    """Plasticity of one (query head, bucket), or NaN with the reason it is undefined.

    ``queries`` holds only finite rows; ``skipped`` counts the bucket's non-finite ones.
    """
    in_bucket = queries.bucket == bucket
    n_queries = int(in_bucket.sum())
    small = n_queries <= head_dim

    def result(n_pairs: int, value: float, reason: str = "") -> BucketResult:
        return BucketResult(group.layer, q_head, group.k_head, bucket, n_queries, skipped, n_pairs, value, small, reason)

    if key_problem or keys is None or index is None:
        return result(0, math.nan, key_problem or "key head not captured")
    if n_queries == 0:
        return result(0, math.nan, "all queries non-finite")
    # Earliest captured position of the bucket (a query's, or a key's: every
    # captured token is also a query position): the furthest a sliding window reaches back.
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
        return result(0, math.nan, "no eligible key pairs" if has_any else "no eligible keys")
    if n_queries < config.min_queries:
        return result(0, math.nan, "too few queries")
    try:
        model = fit_query_model(queries.vectors[in_bucket])
        value = float(pair_plasticity(keys.vectors[pairs[:, 0]], keys.vectors[pairs[:, 1]], model.mean, model.cov).mean())
    except np.linalg.LinAlgError:
        value = math.nan
    if not math.isfinite(value):  # finite inputs should never get here; say so rather than emit a bare NaN
        return result(int(pairs.shape[0]), math.nan, "numerical failure")
    return result(int(pairs.shape[0]), value)


def plan_key_groups(configs: list[str], meta: ModelMeta, num_q_heads: int | None, num_kv_heads: int | None) -> KeyPlan:
    """Group captured query heads by the key head they attend with.

    The mapping is the card's ``key_head_of_query`` (what the family plugin's
    ``qkcore_key_head`` said at capture). With ``--num-q-heads``/``--num-kv-heads``
    given, or a card written before that field existed, it is the default rule
    ``q // (n_q // n_kv)`` (:func:`qkcore.heads.key_head_for`). A card-based
    mapping that names a key head absent from the data although keys were
    captured raises :class:`PlasticityError` naming the query config.
    """
    parsed = [p for p in map(parse_config_name, configs) if p is not None]
    q_heads = sorted((layer, head) for layer, head, kind in parsed if kind == "q")
    k_heads = {(layer, head) for layer, head, kind in parsed if kind == "k"}
    if not q_heads:
        raise PlasticityError("no captured query heads (lXXhYYq) found")
    explicit = num_q_heads is not None or num_kv_heads is not None
    if not explicit and meta.key_head_of_query is not None:
        key_of = _card_mapping(q_heads, meta.key_head_of_query)
        mapping = "the card's key_head_of_query (the family plugin's qkcore_key_head, recorded at capture)"
    else:
        key_of, mapping = _default_mapping(q_heads, meta, num_q_heads, num_kv_heads)
    if not explicit:
        # Without flags the mapping comes from the card, so the data must agree with it.
        keys_captured = meta.keys_captured if meta.keys_captured is not None else bool(k_heads)
        for (layer, q), k in key_of.items():
            if keys_captured and (layer, k) not in k_heads:
                raise PlasticityError(
                    f"{config_name(layer, q, 'q')} attends with key head {k} by {mapping}, but "
                    f"{config_name(layer, k, 'k')} is not in the data although keys were captured "
                    "(wrong mapping or incomplete dataset; --num-q-heads/--num-kv-heads analyse it with the default rule)"
                )
    grouped: dict[tuple[int, int], list[int]] = {}
    for (layer, q), k in key_of.items():
        grouped.setdefault((layer, k), []).append(q)
    groups = tuple(
        KeyGroup(layer, k, tuple(sorted(qs)), (layer, k) in k_heads, meta.window_for(layer))
        for (layer, k), qs in sorted(grouped.items())
    )
    return KeyPlan(groups, mapping)


def _card_mapping(q_heads: list[tuple[int, int]], card: dict[int, dict[int, int]]) -> dict[tuple[int, int], int]:
    """Each captured query head's key head from the card's ``key_head_of_query``."""
    key_of = {}
    for layer, q in q_heads:
        k = card.get(layer, {}).get(q)
        if k is None:
            raise PlasticityError(
                f"{config_name(layer, q, 'q')}: the card's key_head_of_query has no entry for layer {layer} query head {q}"
            )
        key_of[(layer, q)] = k
    return key_of


def _default_mapping(
    q_heads: list[tuple[int, int]], meta: ModelMeta, num_q_heads: int | None, num_kv_heads: int | None
) -> tuple[dict[tuple[int, int], int], str]:
    """Each captured query head's key head by the default GQA rule, and where its head counts came from."""
    n_q = num_q_heads if num_q_heads is not None else meta.num_query_heads
    n_kv = num_kv_heads if num_kv_heads is not None else meta.num_key_value_heads
    if n_q is None or n_kv is None:
        raise PlasticityError(
            "cannot map query heads to key heads: the dataset card has no qkcore.models entry with "
            "num_query_heads/num_key_value_heads; pass --num-q-heads and --num-kv-heads"
        )
    if num_q_heads is not None or num_kv_heads is not None:
        mapping = f"the default GQA rule {DEFAULT_RULE} with n_q={n_q}, n_kv={n_kv} (--num-q-heads/--num-kv-heads given)"
    else:
        mapping = (
            f"the default GQA rule {DEFAULT_RULE} with n_q={n_q}, n_kv={n_kv}: the card has no key_head_of_query "
            "(written before qkcore recorded the family's mapping), so a family with its own mapping would be paired wrongly"
        )
        log.warning("card has no key_head_of_query; mapping query heads with the default GQA rule", rule=DEFAULT_RULE, n_q=n_q, n_kv=n_kv)
    key_of = {}
    for layer, q in q_heads:
        try:
            key_of[(layer, q)] = key_head_for(q, n_q, n_kv)
        except ValueError as exc:
            raise PlasticityError(f"{config_name(layer, q, 'q')}: {exc}") from exc
    return key_of, mapping


def _run_groups(
    source: Source, groups: tuple[KeyGroup, ...], config: PlasticityConfig, workers: int, progress: bool
) -> tuple[list[BucketResult], list[HeadInfo]]:
    """Run every group, in worker processes when ``workers > 1``."""
    rows: list[BucketResult] = []
    infos: list[HeadInfo] = []
    # disable=None: a bar on a terminal only, never a line per update into a log file.
    bar = tqdm(total=sum(len(g.q_heads) for g in groups), desc="plasticity", unit="head",
               disable=None if progress else True)

    def collect(group: KeyGroup, result: tuple[list[BucketResult], list[HeadInfo]]) -> None:
        rows.extend(result[0])
        infos.extend(result[1])
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
    rows.sort(key=lambda r: (r.layer, r.q_head, -1 if r.bucket is None else r.bucket))
    infos.sort(key=lambda i: (i.layer, i.q_head))
    return rows, infos


def _configs(source: Source) -> list[str]:
    """The source's configs; a Hub repo that cannot be listed is one clear error."""
    try:
        return source.configs()
    except PlasticityError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets/hub raise many types for "not there"
        name = source.repo if isinstance(source, HubSource) else str(source.root)
        raise PlasticityError(f"{name}: no such dataset folder, and no Hub dataset of that name could be read ({exc})") from exc


def _require_query_configs(source: Source, configs: list[str]) -> None:
    """A source without one query config is one error naming the folder (or Hub repo) and what was looked for."""
    if any(parsed[2] == "q" for parsed in map(parse_config_name, configs) if parsed is not None):
        return
    if isinstance(source, HubSource):
        where = f"{source.repo}@{source.revision or 'main'}"
    else:
        where = str(getattr(source, "root", source.describe()))
    raise PlasticityError(
        f"{where}: no captured query heads (no lXXhYYq/data.parquet) found; give a data root written by qkcore sniff "
        "(or a Hub dataset repo it was pushed to)"
    )


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
    """Compute plasticity for every captured query head; write CSVs, the plot and a README to ``out_dir``.

    Every input check (card, mapping, configs) runs before any compute or write.
    """
    configs = _configs(source)
    _require_query_configs(source, configs)
    card = source.card()
    facts = RunFacts.from_card(card.read_text(encoding="utf-8") if card is not None else None, model_index)
    models = read_card_models(card)
    if models and not 0 <= model_index < len(models):
        raise PlasticityError(f"--model-index {model_index} out of range: the card lists {len(models)} model(s)")
    meta = ModelMeta.from_card_entry(models[model_index], f"{card}: qkcore.models[{model_index}]") if models else ModelMeta()
    if len(models) > 1:
        log.warning("card lists several models; using one", model_index=model_index, count=len(models))
    plan = plan_key_groups(configs, meta, num_q_heads, num_kv_heads)
    for g in plan.groups:
        if not g.has_keys:
            log.warning("key head not captured", config=config_name(g.layer, g.k_head, "k"))
    rows, infos = _run_groups(source, plan.groups, config, workers, progress)
    for info in infos:
        if info.skipped_queries or info.skipped_keys:
            log.warning(
                "non-finite rows skipped",
                config=config_name(info.layer, info.q_head, "q"),
                queries=info.skipped_queries,
                keys=info.skipped_keys,
            )
    nope = {layer: not applies for layer, applies in meta.rope_layers.items()}
    heads = head_metrics(rows, infos, nope, config.keep_small_buckets)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The provenance goes first and is rewritten last: an interrupted write never leaves
    # another run's plasticity.json beside this run's numbers.
    (out_dir / PROVENANCE_FILE).unlink(missing_ok=True)
    write_csv(out_dir / BUCKETS_CSV, rows, BucketResult)
    write_csv(out_dir / HEADS_CSV, heads, HeadMetrics)
    plot_plasticity(out_dir / PLOT_PNG, rows, title, config.keep_small_buckets, run_key=facts.run_key)
    panel = HeatmapPanel(facts.revision or facts.model or "heads", {(h.layer, h.q_head): h.plasticity for h in heads},
                         facts.num_layers, facts.num_query_heads,
                         tuple(sorted(layer for layer, is_nope in nope.items() if is_nope)))
    plot_heatmaps(out_dir / HEATMAP_PNG, [panel], f"{title}\nper head (layer x query head)", facts.run_key)
    readme = render_readme(source=source.describe(), meta=meta, config=config, mapping=plan.mapping,
                           rows=rows, infos=infos, heads=heads, files=(BUCKETS_CSV, HEADS_CSV, PLOT_PNG),
                           run_key=facts.run_key)
    (out_dir / README_MD).write_text(readme, encoding="utf-8")
    PlasticityProvenance(source.describe(), facts, analysis_settings(config, num_q_heads, num_kv_heads, model_index),
                         __version__).write(out_dir)
    return rows, heads


def analysis_settings(config: PlasticityConfig, num_q_heads: int | None, num_kv_heads: int | None,
                      model_index: int) -> dict[str, object]:
    """Everything besides the data that decided an output's numbers (compared before one is reused)."""
    return {**asdict(config), "num_q_heads": num_q_heads, "num_kv_heads": num_kv_heads, "model_index": model_index}


def summary_line(rows: list[BucketResult], heads: list[HeadMetrics], keep_small_buckets: bool, out: Path) -> str:
    """The one line ``qkcore plasticity`` prints: coverage, small buckets, skipped non-finite rows."""
    valid = sum(not math.isnan(r.plasticity) for r in rows)
    small = sum(h.n_small_buckets for h in heads)
    q_rows = sum(h.skipped_queries for h in heads)
    q_heads = sum(1 for h in heads if h.skipped_queries)
    k_heads = {(h.layer, h.k_head): h.skipped_keys for h in heads if h.skipped_keys}
    return (
        f"plasticity: {len(heads)} heads, {valid}/{len(rows)} head-buckets defined, "
        f"{_count(small, 'small bucket')} {'kept in' if keep_small_buckets else 'left out of'} the means; "
        f"skipped {_count(q_rows, 'non-finite query row')} ({_count(q_heads, 'head')}) and "
        f"{_count(sum(k_heads.values()), 'non-finite key row')} ({_count(len(k_heads), 'key head')}) -> {out}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
