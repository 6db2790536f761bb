"""``qkcore sniff``, ``qkcore push`` and ``qkcore plan``: the commands that take a run configuration."""

from __future__ import annotations

import click
import pluggy

from qkcore.commands.options import DeferredOptions, config_options, load_run_config


@click.command()
@config_options
@click.option("--debug", is_flag=True, help="debug logging (a line per batch)")
@click.option("--quiet", is_flag=True, help="warnings and errors only, no progress line")
@click.option("--json-logs", is_flag=True, help="log lines as JSON objects, no progress line")
@click.option("--restart", is_flag=True,
              help="discard the data root's staged progress (of this or another run) and capture from the start")
@click.option("--replace", is_flag=True,
              help="let this run replace the different run (or foreign files) the data root or Hub branch holds, "
                   "when it finishes")
@click.pass_obj
def sniff(pm: pluggy.PluginManager, config: str, overrides: tuple[str, ...], debug: bool, quiet: bool,
          json_logs: bool, restart: bool, replace: bool) -> None:
    """Capture sampled Q/K rows and write the dataset."""
    from qkcore.logs import configure_logging

    configure_logging(debug=debug, quiet=quiet, json=json_logs)
    cfg = load_run_config(config, overrides)  # before qkcore.sniff imports torch: a config error is reported at once
    if cfg.inference.debug_logging:  # the original tool's switch for verbose logs
        configure_logging(debug=True, quiet=quiet, json=json_logs)
    from qkcore.sniff import run_sniff

    run_sniff(cfg, pm, restart=restart, replace=replace)


@click.command()
@config_options
@click.option("--replace", is_flag=True, help="replace a different run the Hub branch holds")
def push(config: str, overrides: tuple[str, ...], replace: bool) -> None:
    """Upload a finished data root to its Hub branch.

    Retries a push that failed at the end of qkcore sniff.
    """
    cfg = load_run_config(config, overrides)  # before torch is imported
    from qkcore.sniff import run_push

    run_push(cfg, replace=replace)


def _lengths(ctx: click.Context, param: click.Parameter, text: str | None) -> list[int] | None:
    """``--lengths 512,300,...``: non-negative token counts."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated token counts, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise click.BadParameter(f"expected non-negative token counts, got {text!r}")
    return values


def _plan_options() -> list[click.Parameter]:
    """``--documents``, ``--lengths``, ``--sample``, with the plan's defaults (from a module without torch)."""
    from qkcore.plan_defaults import DEFAULT_DOCUMENTS, LENGTH_SAMPLE

    return [
        click.Option(["--documents"], type=click.IntRange(min=1), default=None, metavar="N",
                     help="documents to assume, each tokenizer.max_length long (default: a local dataset is counted "
                          f"and tokenised; a Hub dataset has dataset.max_samples, else {DEFAULT_DOCUMENTS})"),
        click.Option(["--lengths"], callback=_lengths, default=None, metavar="N,N,...",
                     help="explicit token counts of the documents (truncated to tokenizer.max_length)"),
        click.Option(["--sample"], type=click.IntRange(min=1), default=LENGTH_SAMPLE, metavar="N",
                     help="local dataset: tokenise at most N documents, evenly spaced, to measure lengths "
                          f"(default {LENGTH_SAMPLE})"),
        # issue 19: the smallest inference.tensor_parallel_size whose devices hold the run
        click.Option(["--gpu-memory"], default=None, metavar="SIZE",
                     help="memory of one device (e.g. 80GiB): say the smallest tensor_parallel_size that fits "
                          "and the command to run it"),
    ]


@click.command(cls=DeferredOptions, declare=_plan_options)
@config_options
@click.pass_obj
def plan(pm: pluggy.PluginManager, config: str, overrides: tuple[str, ...], documents: int | None,
         lengths: list[int] | None, sample: int, gpu_memory: str | None) -> None:
    """What a config would capture and cost; no weights loaded.

    Layers, heads, expected rows per config, disk, free disk needed while writing,
    a GPU-time estimate, and the memory per device (for each tensor-parallel size).
    """
    cfg = load_run_config(config, overrides)  # before plan_memory and estimate import torch
    from qkcore.plan_memory import parse_size
    device_bytes = parse_size(gpu_memory) if gpu_memory is not None else None  # a bad size: before any work
    from qkcore.estimate import format_plan, make_plan
    from qkcore.plan_memory import format_memory, memory_plan

    click.echo(format_plan(make_plan(cfg, pm, documents=documents, lengths=lengths, sample=sample)))
    click.echo("\n" + format_memory(memory_plan(cfg, pm, device_bytes)))
