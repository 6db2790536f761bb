"""The figures of ``qkcore compare``: heatmaps per run, head plasticity along the runs, distributions.

* ``heatmaps.png``: one layer x head heatmap per run (:mod:`.heatmap`), NoPE layers marked;
* ``trajectory.png``: mean and interquartile range of head plasticity at each run, in the run
  order (by checkpoint step on a log axis when the steps rise along the order and span two
  decades or more; else one slot per run), NoPE and RoPE layers as separate panels, stage
  boundaries marked;
* ``distribution.png``: every run's head plasticities side by side (box and points, NoPE heads
  in their own colour).

The last two use only the heads every run has (``common``), so a point moves because the
heads changed, not because other heads were sampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qkcore.analysis.heatmap import NOPE_COLOUR, HeatmapPanel, plot_heatmaps

if TYPE_CHECKING:  # compare imports this module
    from qkcore.analysis.compare import ComparedRun

__all__ = ["TrajectoryPanel", "plot_distribution", "plot_heatmap_grid", "plot_trajectory", "run_positions",
           "trajectory_panels"]

ROPE_COLOUR = "#1f6fb4"


def plot_heatmap_grid(path: Path, runs: Sequence[ComparedRun]) -> Path:
    """One heatmap panel per run, in the run order."""
    panels = [
        HeatmapPanel(_label(r), {(h.layer, h.q_head): h.plasticity for h in r.heads}, r.facts.num_layers,
                     r.facts.num_query_heads, r.nope_layers)
        for r in runs
    ]
    return plot_heatmaps(path, panels, "head plasticity per run (layer x query head)")


def _label(run: ComparedRun) -> str:
    return run.label if run.step is None or str(run.step) in run.label else f"{run.label} (step {run.step:,})"


def run_positions(runs: Sequence[ComparedRun]) -> tuple[list[float], bool, bool]:
    """x of each run, whether that x is the checkpoint step, and whether the axis is logarithmic.

    Steps are used when every run has one and they rise strictly along the order (a later
    stage that restarts its step count, as SmolLM3's long-context stages do, falls back to
    one slot per run). The axis is logarithmic when the steps span two decades or more.
    """
    steps = [r.step for r in runs]
    if all(s is not None and s > 0 for s in steps) and all(a < b for a, b in zip(steps, steps[1:])):  # type: ignore[operator]
        spans = max(steps) / min(steps) >= 100  # type: ignore[type-var, operator]
        return [float(s) for s in steps], True, spans  # type: ignore[arg-type]
    return [float(i) for i in range(len(runs))], False, False


def _stage_marks(ax, runs: Sequence[ComparedRun], xs: list[float], log: bool) -> None:
    """Dashed lines between runs of different stages, each stage named at its first run."""
    stages = [r.stage for r in runs]
    if not any(stages):
        return
    start = 0
    for i in range(1, len(runs) + 1):
        if i == len(runs) or stages[i] != stages[start]:
            # Rotated, at the stage's first run: labels of one-run stages never overlap.
            ax.text(xs[start], 0.03, stages[start] or "?", transform=ax.get_xaxis_transform(), rotation=90,
                    ha="center", va="bottom", fontsize=8, color="#444444",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
            if i < len(runs):
                boundary = math.sqrt(xs[i - 1] * xs[i]) if log else (xs[i - 1] + xs[i]) / 2
                ax.axvline(boundary, color="#888888", ls="--", lw=1)
            start = i


@dataclass(frozen=True)
class TrajectoryPanel:
    """One panel of ``trajectory.png``: its heads in each run (``nope``: None for all layers)."""

    title: str
    nope: bool | None
    colour: str
    heads: dict[str, list[tuple[int, int, float]]]  # run label -> (layer, query head, plasticity)


def trajectory_panels(runs: Sequence[ComparedRun], common: set[tuple[int, int]]) -> list[TrajectoryPanel]:
    """The panels of ``trajectory.png``: RoPE and NoPE layers apart when any run has NoPE layers."""
    if any(r.nope_layers for r in runs):
        groups = [("RoPE layers", False, ROPE_COLOUR), ("NoPE layers (no positional encoding)", True, NOPE_COLOUR)]
    else:
        groups: list[tuple[str, bool | None, str]] = [("all layers (no NoPE layer in these runs)", None, ROPE_COLOUR)]
    return [
        TrajectoryPanel(title, nope, colour, {
            r.label: [(h.layer, h.q_head, h.plasticity) for h in r.heads if (h.layer, h.q_head) in common
                      and (nope is None or (h.layer in r.nope_layers) == nope)]
            for r in runs
        })
        for title, nope, colour in groups
    ]


def plot_trajectory(path: Path, runs: Sequence[ComparedRun], common: set[tuple[int, int]]) -> Path:
    """Mean and IQR of head plasticity along the runs; NoPE and RoPE layers in separate panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = trajectory_panels(runs, common)
    xs, by_step, log = run_positions(runs)
    fig = Figure(figsize=(max(7.0, 0.75 * len(runs) + 3.0), 3.6 * len(panels) + 1.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        means, lows, highs = [], [], []
        for r in runs:
            values = [value for _, _, value in panel.heads[r.label]]
            q1, q3 = np.percentile(values, [25, 75]) if values else (math.nan, math.nan)
            means.append(float(np.mean(values)) if values else math.nan)
            lows.append(float(q1))
            highs.append(float(q3))
        ax.fill_between(xs, lows, highs, color=panel.colour, alpha=0.2, label="interquartile range over heads")
        ax.plot(xs, means, color=panel.colour, marker="o", lw=2, label="mean over heads")
        counts = sorted({len(v) for v in panel.heads.values()})
        ax.set_title(f"{panel.title}: {'/'.join(map(str, counts))} head(s) per run", fontsize=10, loc="left")
        ax.set_ylabel("head plasticity")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        if log:
            ax.set_xscale("log")
        _stage_marks(ax, runs, xs, log)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    bottom = axes[-1]
    if not by_step:
        bottom.set_xticks(xs)
        bottom.set_xticklabels([_label(r) for r in runs], rotation=30, ha="right", fontsize=8)
        bottom.set_xlabel("run (in the comparison's order)")
    else:
        bottom.set_xlabel("checkpoint step" + (" (log scale)" if log else ""))
    fig.suptitle("head plasticity along the runs (heads every run has)")
    fig.savefig(path)
    return path


def plot_distribution(path: Path, runs: Sequence[ComparedRun], common: set[tuple[int, int]]) -> Path:
    """Each run's head plasticities side by side: a box, and every head as a point (NoPE heads in red)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(max(7.0, 0.8 * len(runs) + 2.5), 5.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    data = []
    for i, r in enumerate(runs):
        heads = [h for h in r.heads if (h.layer, h.q_head) in common]
        data.append([h.plasticity for h in heads])
        jitter = rng.uniform(-0.18, 0.18, size=len(heads))
        colours = [NOPE_COLOUR if h.layer in r.nope_layers else ROPE_COLOUR for h in heads]
        ax.scatter(i + jitter, [h.plasticity for h in heads], s=9, c=colours, alpha=0.6, linewidths=0, zorder=3)
    ax.boxplot(data, positions=range(len(runs)), widths=0.55, showfliers=False, zorder=2,
               medianprops={"color": "black", "lw": 1.6}, boxprops={"color": "#444444"})
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([_label(r) for r in runs], rotation=30 if len(runs) > 4 else 0,
                       ha="right" if len(runs) > 4 else "center", fontsize=8)
    ax.set_xlabel("run")
    ax.set_ylabel("head plasticity (mean over position buckets)")
    ax.set_ylim(0.0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], color="black", lw=1.6, label="median (box: quartiles)"),
               Line2D([], [], ls="", marker="o", color=ROPE_COLOUR, label="head of a RoPE layer")]
    if any(r.nope_layers for r in runs):
        handles.append(Line2D([], [], ls="", marker="o", color=NOPE_COLOUR, label="head of a NoPE layer"))
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.set_title(f"head plasticity per run ({len(common)} heads every run has)")
    fig.savefig(path)
    return path
