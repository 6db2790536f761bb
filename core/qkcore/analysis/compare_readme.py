"""The README of a ``qkcore compare`` output: each run's identity, what differs, and the estimator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from qkcore import __version__

if TYPE_CHECKING:  # compare imports this module
    from qkcore.analysis.compare import ComparedRun
    from qkcore.analysis.plasticity import PlasticityConfig

__all__ = ["render_compare_readme"]


def _cell(value: object) -> str:
    return "?" if value is None or value == "" else str(value).replace("|", "\\|")


def render_compare_readme(
    runs: Sequence[ComparedRun],
    common: set[tuple[int, int]],
    differences: dict[str, dict[str, str]],
    relative: bool | None,
    config: PlasticityConfig,
    files: Sequence[str],
) -> str:
    """Markdown for the comparison's output folder."""
    lines = [
        "# Attention plasticity across runs",
        "",
        f"{len(runs)} runs, in this order; {len(common)} query heads are in every run (the trajectory and "
        "distribution figures use those; the CSV and the heatmaps hold every head of every run).",
        "",
        "| # | run | run key | model | revision | stage | step | dataset | sampler | max length | dtype | heads | "
        "plasticity | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        f = r.facts
        lines.append(
            f"| {i} | {_cell(r.label)} | `{_cell(f.run_key)}` | {_cell(f.model)} | {_cell(f.revision)} | {_cell(r.stage)} | "
            f"{_cell(r.step)} | {_cell(f.dataset)} | {_cell(f.sampler_text())} | {_cell(f.max_length)} | "
            f"{_cell(f.dtype)} | {len(r.heads)} | {_cell(r.origin)} | `{_cell(r.ref.describe())}` |"
        )
    lines += ["", "## Settings that differ between the runs", ""]
    if differences:
        for name, values in differences.items():
            lines.append(f"- **{name}**: " + "; ".join(f"{label}: {value}" for label, value in values.items()))
    else:
        lines.append("None of sampler, bucket size, max length, dataset and dtype differs.")
    lines += ["", "## Positions", ""]
    lengths = {r.facts.max_length for r in runs}
    if relative and len(lengths) == 1:
        lines.append(f"Every run has max length {lengths.pop()} and bucket size {runs[0].facts.bucket_size}: bucket `b` "
                     "is the same stretch of positions in every run.")
    elif relative:
        lines.append(
            "Every run's bucket size is the same fraction of its max length (the protocol's max_length/16), so "
            "bucket `b` covers the same relative stretch of each run's window: runs of different max length "
            "(such as SmolLM3's 4k, 32k and 64k stages) are compared on relative position buckets, and a head's "
            "plasticity, the mean over its buckets, averages over the same relative positions in every run."
        )
    elif relative is None:
        lines.append("Some run's card does not record its bucket size or max length, so whether the buckets "
                     "cover the same relative positions cannot be said.")
    else:
        lines.append(
            "**The runs' bucket sizes are not the same fraction of their max lengths**: their buckets cover "
            "different relative stretches of the window, so head plasticities average over different relative "
            "positions. Capture with `min_bucket_size` = max_length / 16 to compare them on relative buckets."
        )
    settings = (f"seed {config.seed}, {config.pairs_per_bucket} key pairs per bucket, locality {config.locality}, "
                f"at least {config.min_queries} queries per bucket, small buckets "
                f"{'kept' if config.keep_small_buckets else 'left out'}")
    lines += [
        "",
        "## Estimator",
        "",
        f"Head plasticity is `qkcore plasticity`'s (qkcore {__version__}; {settings}): per query bucket, the "
        "queries are one Gaussian, key pairs come from earlier buckets of the same example, "
        "`AP = 4 p (1 - p)` with `p = Phi(d.mu / sqrt(d' Sigma d))`, and a head's value is the mean over its "
        "buckets that count. Each run's own README (under `runs/`, or the reused output named in the table) "
        "states the estimator in full. A run's output is reused only when its `plasticity.json` names the "
        "same run key and the same settings.",
        "",
        "## Files",
        "",
    ]
    words = {
        "head_plasticity.csv": "one row per (run, query head): run, model, revision, stage, step, layer, q_head, "
                               "k_head, nope, sliding_window, plasticity, n_queries (finite query rows fitted)",
        "heatmaps.png": "per run, head plasticity by layer (rows) and query head (columns); NoPE layers marked in red",
        "trajectory.png": "mean and interquartile range of head plasticity at each run, along the run order; RoPE "
                          "and NoPE layers in separate panels; stage boundaries dashed",
        "distribution.png": "each run's head plasticities side by side",
        "README.md": "this file",
    }
    lines += [f"- `{name}`: {words.get(name, '')}" for name in [*files, "README.md"]]
    lines.append("")
    return "\n".join(lines)
