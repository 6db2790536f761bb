"""Writing plasticity results: two CSV tables and a per-bucket plot."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

__all__ = ["BucketResult", "HeadMetrics", "head_metrics", "plot_plasticity", "write_csv"]


@dataclass(frozen=True)
class BucketResult:
    """Plasticity of one query head in one query bucket (NaN with a ``reason`` if undefined)."""

    layer: int
    q_head: int
    k_head: int
    bucket: int
    n_queries: int
    n_pairs: int
    plasticity: float
    reason: str = ""


@dataclass(frozen=True)
class HeadMetrics:
    """Per-head summary: mean plasticity over the buckets where it is defined."""

    layer: int
    q_head: int
    k_head: int
    plasticity: float
    n_buckets: int
    nope: bool | None
    sliding_window: int | None


def head_metrics(
    rows: Sequence[BucketResult], nope: dict[int, bool], windows: dict[tuple[int, int], int | None]
) -> list[HeadMetrics]:
    """Summarise ``rows`` per ``(layer, q_head)``; ``windows`` is keyed the same way."""
    by_head: dict[tuple[int, int, int], list[float]] = {}
    for r in rows:
        by_head.setdefault((r.layer, r.q_head, r.k_head), [])
        if not math.isnan(r.plasticity):
            by_head[(r.layer, r.q_head, r.k_head)].append(r.plasticity)
    out = []
    for (layer, q, k), vals in sorted(by_head.items()):
        mean = float(np.mean(vals)) if vals else math.nan
        out.append(HeadMetrics(layer, q, k, mean, len(vals), nope.get(layer), windows.get((layer, q))))
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


def plot_plasticity(path: Path, rows: Sequence[BucketResult], title: str) -> None:
    """Plasticity per bucket: one thin line per head coloured by layer, bold mean curve."""
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
    heads: dict[tuple[int, int], list[BucketResult]] = {}
    for r in rows:
        heads.setdefault((r.layer, r.q_head), []).append(r)
    layers = sorted({layer for layer, _ in heads}) or [0]
    norm = Normalize(vmin=min(layers), vmax=max(max(layers), min(layers) + 1))
    cmap = colormaps["viridis"]
    for (layer, _), series in sorted(heads.items()):
        series = sorted(series, key=lambda r: r.bucket)
        ax.plot([r.bucket for r in series], [r.plasticity for r in series], lw=0.7, alpha=0.35, color=cmap(norm(layer)))
    buckets = sorted({r.bucket for r in rows})
    means = []
    for b in buckets:
        vals = [r.plasticity for r in rows if r.bucket == b and not math.isnan(r.plasticity)]
        means.append(float(np.mean(vals)) if vals else math.nan)
    if buckets:
        ax.plot(buckets, means, lw=2.6, color="black", label="mean over heads")
        ax.legend(loc="best")
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="layer")
    cbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("query bucket")
    ax.set_ylabel("attention plasticity")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.savefig(path)
