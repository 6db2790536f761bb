"""What the Ray tasks of a sweep run, as plain functions (the driver wraps them with ``ray.remote``).

Each runs in a Ray worker, maybe on another machine, under the lock its sweep holds
(``held``: the lock's token, checked by the data root). A failure the user must fix
(:class:`~qkcore.errors.QkcoreError`, :class:`~qkcore.config.ConfigError`: exit 2) is
*returned* as a failed :class:`Outcome`, so Ray does not retry it; anything else raises,
and a worker that dies (killed, out of memory, node lost) is retried by Ray
(``max_retries``), resuming from the last commit the data root holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal

from qkcore.config import ConfigError, SniffConfig
from qkcore.errors import QkcoreError
from qkcore.sweep.progress import Event, Status, event


@dataclass(frozen=True)
class Outcome:
    """What a task did: ``done``, ``failed`` (exit 2, ``message``), or ``shards`` (a prepare: the shards capture next)."""

    status: Literal["done", "failed", "shards"]
    action: str = ""
    rows: int = 0
    message: str = ""


#: Where a task reports progress (the driver's board actor, or nothing).
Report = Callable[[Event], None]


def board_reporter(board: Any) -> Report:
    """Report to the board actor ``board`` (fire and forget; ``None``: report nowhere)."""
    if board is None:
        return lambda e: None
    return lambda e: board.report.remote(e)


def _user_errors(run: str, unit: int | None, report: Report, work: Callable[[], Outcome]) -> Outcome:
    """``work()``, with a user error turned into a failed outcome (not retried) and reported."""
    try:
        return work()
    except (QkcoreError, ConfigError) as exc:
        report(event(run, unit, "failed", detail=str(exc)))
        return Outcome("failed", message=str(exc))


def _progress(run: str, unit: int | None, report: Report) -> Callable[[dict[str, Any], int | None], None]:
    """A commit hook that reports the committed documents (``publishing`` once the unit is captured)."""

    def committed(state: dict[str, Any], share: int | None) -> None:
        done = int(state.get("documents", 0)) + int(state.get("skipped", 0))
        status: Status = "capturing" if state.get("phase") == "capturing" or unit is not None else "publishing"
        report(event(run, unit, status, done, share))

    return committed


def _setup() -> None:
    """Logging for this task (a Ray worker runs many tasks: drop the last one's bound run key and shard)."""
    import structlog

    from qkcore.logs import configure_logging

    structlog.contextvars.clear_contextvars()
    configure_logging()


def sniff_task(cfg: SniffConfig, run: str, held: str, board: Any = None) -> Outcome:
    """A whole run in this worker (``qkcore sniff`` under the sweep's lock); tensor_parallel_size K > 1 runs under torchrun."""
    _setup()
    report = board_reporter(board)
    report(event(run, None, "capturing"))

    def work() -> Outcome:
        from qkcore.sniff import run_sniff
        from qkcore.tensor_parallel import size_of

        if size_of(cfg) > 1:
            return _torchrun(cfg, run, held, size_of(cfg), report)
        result = run_sniff(cfg, held=held, on_commit=_progress(run, None, report))
        report(event(run, None, "done", result.documents, detail=result.action))
        return Outcome("done", result.action, sum(result.rows.values()))

    return _user_errors(run, None, report, work)


def _torchrun(cfg: SniffConfig, run: str, held: str, k: int, report: Report) -> Outcome:
    """Run ``qkcore sniff`` as a torchrun group of ``k`` processes on this node, under the sweep's lock."""
    from qkcore.sniff import HELD_LOCK_ENV

    if cfg.source is None:
        raise QkcoreError(f"{run}: a tensor-parallel run needs its config file")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={k}",
               "-m", "qkcore", "sniff", "--config", str(cfg.source)]
    done = subprocess.run(command, env={**os.environ, HELD_LOCK_ENV: held}, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(done.stderr)
    if done.returncode == 0:
        report(event(run, None, "done", detail="captured under torchrun"))
        return Outcome("done", "captured")
    last = next((text for text in reversed(done.stderr.splitlines()) if text.strip()), "")
    if done.returncode == 2:  # qkcore's one-line error: the user must fix it
        raise QkcoreError(last.removeprefix("qkcore: error: ").strip() or f"{run}: torchrun exited 2")
    raise RuntimeError(f"{run}: torchrun exited {done.returncode}: {last}")


def prepare_task(cfg: SniffConfig, run: str, held: str, shards: int, board: Any = None) -> Outcome:
    """A ``--shards`` run's rule: skip it if complete (or publish/pull it), else tell the driver to start the shards."""
    _setup()
    report = board_reporter(board)

    def work() -> Outcome:
        from qkcore.actions.context import ShardedRun
        from qkcore.sniff import run_sniff

        result = run_sniff(cfg, held=held, shards=ShardedRun(shards, finalize=False))
        if result.action == "shards to capture":
            return Outcome("shards")
        report(event(run, None, "done", result.documents, detail=result.action))
        return Outcome("done", result.action, sum(result.rows.values()))

    return _user_errors(run, None, report, work)


def shard_task(cfg: SniffConfig, run: str, held: str, shard: int, shards: int, board: Any = None) -> Outcome:
    """Capture shard ``shard`` of ``shards`` (resuming from its last commit)."""
    _setup()
    report = board_reporter(board)
    report(event(run, shard, "capturing"))

    def work() -> Outcome:
        from qkcore.sniff import run_shard

        state = run_shard(cfg, shard, shards, held=held, on_commit=_progress(run, shard, report))
        report(event(run, shard, "done", state.documents + state.skipped))
        return Outcome("done", "captured")

    return _user_errors(run, shard, report, work)


def finalize_task(cfg: SniffConfig, run: str, held: str, shards: int, board: Any = None) -> Outcome:
    """Merge a ``--shards`` run's shards, finish, publish and push it (byte-identical to one process)."""
    _setup()
    report = board_reporter(board)
    report(event(run, None, "publishing"))

    def work() -> Outcome:
        from qkcore.actions.context import ShardedRun
        from qkcore.sniff import run_sniff

        result = run_sniff(cfg, held=held, shards=ShardedRun(shards, finalize=True))
        report(event(run, None, "done", result.documents, detail=result.action))
        return Outcome("done", result.action, sum(result.rows.values()))

    return _user_errors(run, None, report, work)
