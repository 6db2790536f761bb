"""The layer x head heatmap of head plasticity: one panel per run, NoPE layers marked.

Used by ``qkcore plasticity`` (one run) and ``qkcore compare`` (every run, side by side,
one shared colour scale from 0 to 1 so the panels read alike). Cells of heads that were
not sampled, or whose plasticity is undefined, are grey.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["HeatmapPanel", "plot_heatmaps"]

#: Panels per row of the figure.
MAX_COLUMNS = 5
NOPE_COLOUR = "#c0392b"


@dataclass(frozen=True)
class HeatmapPanel:
    """One run's heads: ``values`` maps (layer, query head) to plasticity (NaN: undefined)."""

    label: str
    values: dict[tuple[int, int], float]
    num_layers: int | None = None
    num_query_heads: int | None = None
    nope_layers: tuple[int, ...] = field(default=())

    def grid(self) -> np.ndarray:
        """``layers x query heads`` matrix, NaN where no head (or no value) is."""
        layers = max([*(layer + 1 for layer, _ in self.values), *(n + 1 for n in self.nope_layers), self.num_layers or 0, 1])
        heads = max([*(head + 1 for _, head in self.values), self.num_query_heads or 0, 1])
        grid = np.full((layers, heads), np.nan)
        for (layer, head), value in self.values.items():
            grid[layer, head] = value
        return grid


def plot_heatmaps(path: Path, panels: Sequence[HeatmapPanel], title: str, run_key: str | None = None) -> Path:
    """Draw ``panels`` into one PNG at ``path`` (``run_key``, when given, is written into its text)."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    grids = [p.grid() for p in panels]
    columns = min(MAX_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    layers = max(g.shape[0] for g in grids)
    heads = max(g.shape[1] for g in grids)
    # Panel size follows the grid: about 0.17 in per layer row, 0.22 in per head column.
    panel_w = max(3.6, 0.22 * heads + 1.0)
    panel_h = max(2.4, 0.17 * layers + 1.1)
    fig = Figure(figsize=(panel_w * columns + 1.3, panel_h * rows + 0.9), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    axes = fig.subplots(rows, columns, squeeze=False)
    image = None
    for ax, panel, grid in zip(axes.flat, panels, grids):
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                          interpolation="nearest")
        n_layers, n_heads = grid.shape
        step = 1 if n_layers <= 40 else 2
        ax.set_yticks(range(0, n_layers, step))
        ax.set_yticklabels([str(i) for i in range(0, n_layers, step)], fontsize=6 if n_layers > 24 else 8)
        head_step = 1 if n_heads <= 16 else 2
        ax.set_xticks(range(0, n_heads, head_step))
        ax.set_xticklabels([str(i) for i in range(0, n_heads, head_step)], fontsize=6 if n_heads > 12 else 8)
        for tick in ax.get_yticklabels():
            if int(tick.get_text()) in panel.nope_layers:
                tick.set_color(NOPE_COLOUR)
                tick.set_fontweight("bold")
        for layer in panel.nope_layers:  # a red bar left of each NoPE row
            ax.plot([-0.5, -0.5], [layer - 0.5, layer + 0.5], color=NOPE_COLOUR, lw=4, clip_on=False,
                    solid_capstyle="butt")
        ax.set_xlim(-0.5, n_heads - 0.5)
        ax.set_title(panel.label, fontsize=9)
        ax.set_xlabel("query head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=axes, label="head plasticity (mean over position buckets)", shrink=0.8)
    if any(p.nope_layers for p in panels):
        fig.legend(handles=[Line2D([], [], color=NOPE_COLOUR, lw=4, label="NoPE layer (no RoPE)"),
                            Line2D([], [], color="#d9d9d9", lw=6, label="not sampled / undefined")],
                   loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    else:
        fig.legend(handles=[Line2D([], [], color="#d9d9d9", lw=6, label="not sampled / undefined")],
                   loc="outside lower center", fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10 if len(panels) == 1 else 12, wrap=True)
    fig.savefig(path, metadata={"qkcore:run_key": run_key} if run_key else None)
    return path
