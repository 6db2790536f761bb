"""The README written next to plasticity results: what was computed, from what, and how.

A CSV of numbers without its estimator is easy to misread; this file pins the
definition, every knob that changed the numbers, the data source and the
qkcore version beside them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from qkcore import __version__
from qkcore.analysis.data import ModelMeta
from qkcore.analysis.report import BucketResult, HeadInfo, HeadMetrics

if TYPE_CHECKING:  # plasticity imports this module
    from qkcore.analysis.plasticity import PlasticityConfig

__all__ = ["render_readme"]


def _model_line(meta: ModelMeta) -> str:
    if meta.name is None:
        return "- Model: unknown (the dataset card has no `qkcore.models` entry)"
    return f"- Model: `{meta.name}` (revision `{meta.revision or 'default'}`), from the dataset card"


def _head_dims(infos: Sequence[HeadInfo]) -> str:
    dims = sorted({i.head_dim for i in infos if i.head_dim})
    return ", ".join(map(str, dims)) or "unknown"


def _windows(infos: Sequence[HeadInfo]) -> str:
    by_layer = sorted({(i.layer, i.sliding_window) for i in infos if i.sliding_window is not None})
    if not by_layer:
        return "No captured layer has a sliding window, so this rule did not apply."
    return "Windows used (layer: tokens): " + ", ".join(f"{layer}: {w}" for layer, w in by_layer) + "."


def render_readme(
    *,
    source: str,
    meta: ModelMeta,
    config: PlasticityConfig,
    mapping: str,
    rows: Sequence[BucketResult],
    infos: Sequence[HeadInfo],
    heads: Sequence[HeadMetrics],
    files: tuple[str, str, str],
    run_key: str | None = None,
) -> str:
    """Markdown describing the results in ``files`` (bucket CSV, head CSV, plot)."""
    buckets_csv, heads_csv, plot = files
    defined = sum(not math.isnan(r.plasticity) for r in rows)
    small = sum(1 for r in rows if r.small_bucket and not math.isnan(r.plasticity))
    q_skipped = sum(i.skipped_queries for i in infos)
    k_skipped = sum({(i.layer, i.k_head): i.skipped_keys for i in infos}.values())
    dims = _head_dims(infos)
    small_rule = (
        "kept in the head means and the plot (`--keep-small-buckets`)"
        if config.keep_small_buckets
        else "left out of the head means and of the plot (pass `--keep-small-buckets` to keep them)"
    )
    lines = [
        "# Attention plasticity",
        "",
        f"- Data: `{source}`",
        f"- Run key: `{run_key}` (from the dataset card; `plasticity.json` records it with the settings)"
        if run_key else "- Run key: unknown (the dataset card records none)",
        _model_line(meta),
        f"- qkcore {__version__}; seed {config.seed}; {config.pairs_per_bucket} key pairs per bucket; "
        f"locality {config.locality}; at least {config.min_queries} queries per bucket",
        f"- {len(heads)} query heads, {defined}/{len(rows)} head-buckets defined, "
        f"{small} small bucket(s) {'kept' if config.keep_small_buckets else 'left out'}; "
        f"{q_skipped} non-finite query row(s) and {k_skipped} non-finite key row(s) skipped",
        "",
        "## Files",
        "",
        f"- `{buckets_csv}`: one row per (query head, query bucket). `n_queries` finite queries fitted, "
        "`skipped_queries` non-finite ones left out, `n_pairs` key pairs averaged, `plasticity` (NaN with "
        "a `reason` when undefined), `small_bucket` (see below). A query config with no rows has one row "
        "with an empty `bucket` and reason `no rows`.",
        f"- `{heads_csv}`: one row per query head. `plasticity` is the mean over the `n_buckets` buckets "
        "that count; `n_small_buckets` small buckets, `skipped_queries` / `skipped_keys` non-finite rows "
        "of the head and of its key head, `nope` (layer without RoPE), `sliding_window`, and a `reason` "
        "whenever `plasticity` is NaN.",
        f"- `{plot}`: plasticity per bucket, one thin line per head coloured by layer, the mean over "
        "heads in bold; only buckets that count are drawn.",
        "- `heatmap.png`: head plasticity by layer (rows) and query head (columns), NoPE layers marked; "
        "grey cells were not sampled or are undefined.",
        "",
        "## Estimator",
        "",
        "1. **Query model.** For each query head and query bucket `t`, the bucket's captured queries are "
        "one Gaussian `N(mu_t, Sigma_t)`: the sample mean, and the unbiased sample covariance, shrunk "
        "towards a scaled identity with the Ledoit-Wolf intensity when it is singular.",
        f"2. **Key pairs.** {config.pairs_per_bucket} pairs per bucket from the key head the query head "
        "attends with; both keys of a pair come from the same example and from earlier buckets `c < t` "
        "(never from the query's own bucket). An example is drawn with probability proportional to its "
        "eligible keys, an anchor uniformly among them, and a neighbour uniformly among the example's "
        f"other eligible keys within `floor({config.locality} * (L + 1))` positions of the anchor, `L` "
        "being the example's last captured key position (the 5% locality rule at the default 0.05); "
        "if none is that close, the nearest eligible key by position. The order inside a pair is random. "
        "Effect: pairs compare nearby keys, so the number measures how much the query's content decides "
        "between neighbouring keys rather than how strongly distance does; with sparse captures the "
        "nearest-key fallback can pair keys further apart than the bound.",
        "3. **Sliding window.** In a layer with a window of `w` tokens a key is eligible only if "
        "`position > s - w`, `s` being the earliest captured position of bucket `t` (queries and keys): "
        "transformers' sliding mask lets a query at `p` see keys at `p - w < k <= p`, so these are the "
        "keys some query of the bucket can attend to. The rule is applied by position, not by whole "
        f"buckets. {_windows(infos)}",
        "4. **Plasticity.** For a pair with `d = k1 - k2`, `p = Phi(d.mu_t / sqrt(d' Sigma_t d))` is the "
        "probability that the query prefers `k1`, and `AP = 4 p (1 - p)` (1: the query's content decides, "
        "0: the preference is fixed). A bucket's value is the mean `AP` over its pairs.",
        f"5. **Seed.** Pairs of bucket `t` come from `numpy.random.default_rng([{config.seed}, layer, "
        "key head, t])`: the numbers do not depend on worker scheduling, and query heads sharing a key "
        "head are compared on the same pairs.",
        f"6. **Small buckets.** A bucket with at most head_dim ({dims}) queries has a singular sample "
        "covariance, and its shrunk estimate reads lower than the same head's full buckets. Such buckets "
        f"are flagged `small_bucket` and {small_rule}.",
        "7. **Non-finite rows.** A query or key row whose vector holds a NaN or an infinity is left out "
        "before anything is fitted or sampled and is counted in `skipped_queries` / `skipped_keys` "
        f"(this run: {q_skipped} query row(s), {k_skipped} key row(s)).",
        f"8. **Head mean.** The mean of the defined buckets that count (rule 6); the first bucket never "
        f"has earlier keys. Buckets with fewer than {config.min_queries} queries are undefined.",
        f"9. **Query head to key head.** By {mapping}.",
        "",
        "## Compared with attention-plasticity",
        "",
        "The original analysis (viktor-shcherb/attention-plasticity) turns a layer's sliding window, "
        "a number of tokens, into a look-back of that many *buckets*; with windows of thousands of "
        "tokens every earlier bucket stays eligible, so its sliding-window rule never applies. Here the "
        "window is applied by position (rule 3). The original also models queries with a linear drift "
        "in position and a diagonal noise covariance and draws each pair from a single key bucket; this "
        "estimator fits a full covariance per query bucket and draws pairs across all eligible earlier "
        "buckets.",
        "",
    ]
    return "\n".join(lines)

