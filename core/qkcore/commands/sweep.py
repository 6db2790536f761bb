"""``qkcore sweep``: many runs, and runs split into shards, as Ray tasks (:mod:`qkcore.sweep`)."""

from __future__ import annotations

import click
import pluggy


@click.command()
@click.argument("configs", nargs=-1, required=True, metavar="CONFIG_OR_FOLDER...")
@click.option("--address", default=None, metavar="ADDR",
              help="join a Ray cluster (auto, or ray://host:port); default: start Ray in this process")
@click.option("--shards", type=click.IntRange(min=1), default=1, metavar="K",
              help="split each run's documents into K shards of whole batches, each a task on any machine")
@click.option("--max-retries", type=click.IntRange(min=0), default=3, metavar="N",
              help="rerun a task whose worker died (crash, kill, lost node) up to N times, from its last commit")
@click.option("--restart", is_flag=True, help="discard each data root's staged progress and capture from the start")
@click.option("--dry-run", is_flag=True, help="print the plan of every run (rows, disk, GPUs, time); run nothing")
@click.pass_obj
def sweep(pm: pluggy.PluginManager, configs: tuple[str, ...], address: str | None, shards: int, max_retries: int,
          restart: bool, dry_run: bool) -> None:
    """Run every config (a folder: every *.yaml below it) as Ray tasks.

    Runs already complete are skipped; a failed run is named in the final table.
    Exit 0 when every run is complete, 2 when one failed for a reason you must fix,
    1 otherwise.
    """
    from qkcore.logs import configure_logging

    configure_logging()
    if dry_run:
        _dry_run(pm, configs, shards)
        return
    from qkcore.sweep.driver import SweepOptions, run_sweep
    from qkcore.sweep.summary import exit_code, table

    reports = run_sweep(configs, SweepOptions(address, shards, max_retries, restart), echo=click.echo)
    click.echo("\n" + table(reports))
    click.get_current_context().exit(exit_code(reports))


def _dry_run(pm: pluggy.PluginManager, configs: tuple[str, ...], shards: int) -> None:
    """Each run's ``qkcore plan`` and the GPUs its task asks for; exit 2 when a config does not load."""
    from qkcore.estimate import format_plan, make_plan
    from qkcore.sweep.driver import gpus_for
    from qkcore.sweep.runs import load_runs
    from qkcore.tensor_parallel import size_of

    failed = False
    for run in load_runs(configs):
        click.echo(f"== {run.name}")
        if run.cfg is None:
            click.echo(f"failed: {run.error}")
            failed = True
            continue
        gpus = gpus_for(run.cfg, cluster_gpus=1)
        tasks = f"{shards} shard tasks, then one finalize task, each" if shards > 1 else "one task"
        click.echo(f"sweep: {tasks} asking for {gpus} GPU(s) (tensor_parallel_size {size_of(run.cfg)}); nothing runs")
        click.echo(format_plan(make_plan(run.cfg, pm)) + "\n")
    click.get_current_context().exit(2 if failed else 0)
