"""Writing plasticity results: two CSV tables and a per-bucket plot."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

__all__ = ["BucketResult", "HeadInfo", "HeadKey", "HeadMetrics", "counts_in_mean", "head_metrics", "plot_plasticity", "write_csv"]


@dataclass(frozen=True)
class HeadKey:
    """A captured query head (layer, head) and the key head it attends with: the first columns of every table."""

    layer: int
    q_head: int
    k_head: int


@dataclass(frozen=True)
class BucketResult(HeadKey):
    """Plasticity of one query head in one query bucket (NaN with a ``reason`` if undefined).

    ``bucket`` is ``None`` only on the single row of a head with no rows at all.
    ``n_queries`` counts the finite query rows the Gaussian was fitted to;
    ``skipped_queries`` the non-finite ones left out. ``small_bucket`` flags a
    bucket with at most ``head_dim`` queries (its sample covariance is singular
    and had to be shrunk).
    """

    bucket: int | None
    n_queries: int
    skipped_queries: int
    n_pairs: int
    plasticity: float
    small_bucket: bool
    reason: str = ""


@dataclass(frozen=True)
class HeadInfo(HeadKey):
    """What the analysis of one query head reports besides its bucket rows."""

    sliding_window: int | None
    head_dim: int
    skipped_queries: int
    skipped_keys: int
    #: Why the head has no plasticity at all, when that is known before any bucket ("no rows").
    reason: str = ""


@dataclass(frozen=True)
class HeadMetrics(HeadKey):
    """Per-head summary: mean plasticity over the buckets that count (see :func:`counts_in_mean`)."""

    plasticity: float
    n_buckets: int
    n_small_buckets: int
    skipped_queries: int
    skipped_keys: int
    nope: bool | None
    sliding_window: int | None
    reason: str = ""


def counts_in_mean(row: BucketResult, keep_small_buckets: bool) -> bool:
    """Whether ``row`` enters head means and the plot: defined, and not small unless kept."""
    return not math.isnan(row.plasticity) and (keep_small_buckets or not row.small_bucket)


def head_metrics(
    rows: Sequence[BucketResult], infos: Sequence[HeadInfo], nope: dict[int, bool], keep_small_buckets: bool
) -> list[HeadMetrics]:
    """One summary per head of ``infos``, from its ``rows``; a NaN mean always carries a reason."""
    by_head: dict[tuple[int, int], list[BucketResult]] = {}
    for r in rows:
        by_head.setdefault((r.layer, r.q_head), []).append(r)
    out = []
    for info in sorted(infos, key=lambda i: (i.layer, i.q_head)):
        mine = by_head.get((info.layer, info.q_head), [])
        used = [r.plasticity for r in mine if counts_in_mean(r, keep_small_buckets)]
        small = sum(1 for r in mine if r.small_bucket and not math.isnan(r.plasticity))
        reason = ""
        if not used:
            if info.reason:
                reason = info.reason
            elif small:
                reason = "only small buckets (fewer queries than head_dim + 1; see --keep-small-buckets)"
            else:
                reason = "no bucket defined: " + "; ".join(sorted({r.reason for r in mine if r.reason}))
        out.append(
            HeadMetrics(
                info.layer,
                info.q_head,
                info.k_head,
                float(np.mean(used)) if used else math.nan,
                len(used),
                small,
                info.skipped_queries,
                info.skipped_keys,
                nope.get(info.layer),
                info.sliding_window,
                reason,
            )
        )
    return out


def _cell(value: object) -> str:
    """CSV cell: floats in round-trip precision, ``None`` as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def write_csv(path: Path, rows: Iterable[BucketResult | HeadMetrics], cls: type) -> None:
    """Write dataclass ``rows`` of type ``cls`` with a header of its field names."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([f.name for f in fields(cls)])
        for row in rows:
            writer.writerow([_cell(v) for v in asdict(row).values()])


def plot_plasticity(path: Path, rows: Sequence[BucketResult], title: str, keep_small_buckets: bool = False,
                    run_key: str | None = None) -> None:
    """Plasticity per bucket: one thin line per head coloured by layer, bold mean curve.

    Only rows that :func:`counts_in_mean` are drawn, so the curves show what the head means average.
    ``run_key``, when known, is written into the PNG's text (which run the plot shows).
    """
    # Figure + Agg canvas directly: no pyplot global state, works headless.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = [r for r in rows if r.bucket is not None]
    # Rows left out of the means are drawn as gaps, not bridged.
    shown = {id(r): r.plasticity if counts_in_mean(r, keep_small_buckets) else math.nan for r in rows}
    heads: dict[tuple[int, int], list[BucketResult]] = {}
    for r in rows:
        heads.setdefault((r.layer, r.q_head), []).append(r)
    layers = sorted({layer for layer, _ in heads}) or [0]
    norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    cmap = colormaps["viridis"]
    for (layer, _), series in sorted(heads.items()):
        series = sorted(series, key=lambda r: r.bucket)
        ax.plot([r.bucket for r in series], [shown[id(r)] for r in series], lw=0.7, alpha=0.35, color=cmap(norm(layer)))
    buckets = sorted({r.bucket for r in rows if not math.isnan(shown[id(r)])})
    means = [float(np.mean([shown[id(r)] for r in rows if r.bucket == b and not math.isnan(shown[id(r)])])) for b in buckets]
    if buckets:
        label = "mean over heads" + ("" if keep_small_buckets else " (small buckets left out)")
        ax.plot(buckets, means, lw=2.6, color="black", label=label)
        ax.legend(loc="best")
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
    cbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("query bucket")
    ax.set_ylabel("attention plasticity")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.savefig(path, metadata={"qkcore:run_key": run_key} if run_key else None)
