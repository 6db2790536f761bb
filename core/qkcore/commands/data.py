"""``qkcore inspect``, ``qkcore plasticity`` and ``qkcore compare``: the commands that read captured datasets."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from qkcore.commands.options import DeferredOptions


def _inspect_options() -> list[click.Parameter]:
    """``--out``, naming inspect_data.py's default plot file."""
    from qkcore.inspect_data import DEFAULT_PLOT

    return [click.Option(["--out"], type=click.Path(path_type=Path), default=None, metavar="PNG",
                         help=f"plot file (default: DATA_ROOT/{DEFAULT_PLOT}, or ./{DEFAULT_PLOT} for a URL)")]


def _is_url(data_root: str) -> bool:
    from qkcore.output.store import url_scheme

    return url_scheme(data_root) is not None


@contextmanager
def _local(data_root: str) -> Iterator[Path]:
    """A local folder holding the data root's published files: the folder itself, or a verified download of a URL's."""
    if not _is_url(data_root):
        yield Path(data_root)
        return
    from qkcore.output import open_root

    with open_root(data_root).local_copy() as folder:
        yield folder


@click.command(cls=DeferredOptions, declare=_inspect_options)
@click.argument("data_root", metavar="DATA_ROOT")
def inspect(data_root: str, out: Path | None) -> None:
    """Summarise a captured data folder (rows, coverage, plot).

    Rows per config and bucket, coverage of layers, heads and examples (checked
    against the manifest), and a plot of rows per bucket. DATA_ROOT is a folder
    written by qkcore sniff, or its URL (s3://bucket/prefix: the files are downloaded
    into the local work folder first, and the plot goes to the current folder).
    """
    from qkcore.inspect_data import DEFAULT_PLOT, format_inspection, inspect_data, plot_rows_per_bucket

    with _local(data_root) as folder:
        inspection = inspect_data(folder)
        default = Path(DEFAULT_PLOT).resolve() if _is_url(data_root) else folder / DEFAULT_PLOT
        plot = plot_rows_per_bucket(inspection, out or default)
        text = format_inspection(inspection).replace(str(folder), data_root)  # name the URL, not the download
    click.echo(text)
    click.echo(f"\nplot: {plot}")


def _estimator_options() -> list[click.Parameter]:
    """The estimate's options, with PlasticityConfig's defaults (shared by plasticity and compare)."""
    from qkcore.analysis.plasticity import PlasticityConfig

    default = PlasticityConfig()
    positive, non_negative = click.IntRange(min=1), click.IntRange(min=0)
    return [
        click.Option(["--seed"], type=non_negative, default=default.seed,
                     help=f"pair-sampling seed (default: {default.seed})"),
        click.Option(["--pairs-per-bucket"], type=positive, default=default.pairs_per_bucket,
                     help=f"key pairs per query bucket (default: {default.pairs_per_bucket})"),
        click.Option(["--min-queries"], type=positive, default=default.min_queries,
                     help=f"fewest queries for a bucket's Gaussian (default: {default.min_queries}, at least 2 used)"),
        click.Option(["--keep-small-buckets"], is_flag=True,
                     help="average buckets with at most head_dim queries into the head means and the plot's mean "
                          "curve (default: flagged, left out)"),
        click.Option(["--locality"], type=click.FloatRange(0.0, 1.0), default=default.locality,
                     help="neighbour bound as a fraction of the example's captured length "
                          f"(default: {default.locality})"),
        click.Option(["--workers"], type=positive, default=min(4, os.cpu_count() or 1),
                     help="worker processes (default: min(4, cpus))"),
        click.Option(["--no-progress"], is_flag=True, help="hide the progress bar"),
    ]


def _plasticity_options() -> list[click.Parameter]:
    """plasticity's options: the source, the output, the estimate's, and head-count overrides."""
    positive, non_negative = click.IntRange(min=1), click.IntRange(min=0)
    return [
        click.Option(["--revision"], default=None, help="Hub branch/revision (one model per branch)"),
        click.Option(["--out"], type=click.Path(path_type=Path), default=None,
                     help="output folder (default: DATA_ROOT/plasticity, or ./plasticity for a Hub repo or a URL)"),
        *_estimator_options(),
        click.Option(["--num-q-heads"], type=positive, default=None, help="query heads per layer (overrides the card)"),
        click.Option(["--num-kv-heads"], type=positive, default=None,
                     help="key/value heads per layer (overrides the card)"),
        click.Option(["--model-index"], type=non_negative, default=0,
                     help="which qkcore.models card entry to use (default: 0)"),
    ]


@click.command(cls=DeferredOptions, declare=_plasticity_options)
@click.argument("data", metavar="DATA_ROOT_OR_HUB_REPO")
def plasticity(data: str, revision: str | None, out: Path | None, seed: int, pairs_per_bucket: int, min_queries: int,
               keep_small_buckets: bool, locality: float, workers: int, num_q_heads: int | None,
               num_kv_heads: int | None, model_index: int, no_progress: bool) -> None:
    """Attention plasticity per query head and position bucket.

    DATA_ROOT_OR_HUB_REPO is a dataset folder, its URL (s3://bucket/prefix: its files are
    downloaded and checked first), or a Hub dataset repo id. Writes the per-bucket and
    per-head CSVs, a plot and a README to the output folder and prints a one-line summary.
    """
    from qkcore.analysis.data import LocalSource, open_source
    from qkcore.analysis.plasticity import PlasticityConfig, run_plasticity, summary_line

    url = _is_url(data)
    with _local(data) as folder:
        source = LocalSource(folder) if url else open_source(data, revision)
        if out is None:
            out = source.root / "plasticity" if isinstance(source, LocalSource) and not url else Path("plasticity")
        if url:
            title = data
        else:
            title = source.root.name if isinstance(source, LocalSource) else f"{source.repo}@{source.revision or 'main'}"
        config = PlasticityConfig(seed, pairs_per_bucket, max(min_queries, 2), locality, keep_small_buckets)
        rows, heads = run_plasticity(
            source, out, config, workers=workers, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
            model_index=model_index, progress=not no_progress, title=f"attention plasticity: {title}",
        )
    click.echo(summary_line(rows, heads, config.keep_small_buckets, out))


def _compare_options() -> list[click.Parameter]:
    """compare's options: the output, the order, the labels, and the estimate's."""
    return [
        click.Option(["--out"], type=click.Path(path_type=Path), default=Path("compare"), show_default=True,
                     help="output folder"),
        click.Option(["--order"], default=None, metavar="step|name|FILE.yaml",
                     help="run order: by checkpoint step (stage, then step, read from revisions like "
                          "stage1-step-40000), by label, or as a YAML file lists them (runs: [{run, label, stage, "
                          "step}]); default: by step when every run has one, else as given"),
        click.Option(["--label", "labels"], multiple=True,
                     help="a run's label, once per run in the order the runs are named (default: folder or branch name)"),
        *_estimator_options(),
    ]


@click.command(cls=DeferredOptions, declare=_compare_options)
@click.argument("runs", metavar="RUN...", nargs=-1, required=True)
def compare(runs: tuple[str, ...], out: Path, order: str | None, labels: tuple[str, ...], seed: int,
            pairs_per_bucket: int, min_queries: int, keep_small_buckets: bool, locality: float, workers: int,
            no_progress: bool) -> None:
    """Compare head plasticity across runs (checkpoints, models, sizes).

    A RUN is a data root, a Hub owner/repo@branch, a whole Hub owner/repo (every branch
    its main README's index lists), or a `qkcore plasticity` output folder. Writes a
    tidy CSV, per-run heatmaps, plasticity along the runs (NoPE and RoPE layers apart),
    the distributions side by side, and a README naming every run.
    """
    from qkcore.analysis.compare import compare_runs
    from qkcore.analysis.plasticity import PlasticityConfig

    config = PlasticityConfig(seed, pairs_per_bucket, max(min_queries, 2), locality, keep_small_buckets)
    result = compare_runs(runs, out, config, order=order, labels=labels or None, workers=workers,
                          progress=not no_progress)
    click.echo(f"compare: {len(result.runs)} runs ({', '.join(r.label for r in result.runs)}), "
               f"{len(result.common)} heads in common -> {out}")
