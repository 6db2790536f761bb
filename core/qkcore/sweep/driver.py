"""The sweep itself: start or join Ray, hold every run's data root, schedule the runs' tasks, report.

The driver holds the lock of every run's data root for the whole sweep (a second sweep,
or a ``qkcore sniff``, on one of them is refused at once, naming this one); its tasks
check that they run under it. A run is one task, or, with ``--shards K``, a prepare task
(the data root's rule), K shard tasks and one finalize task.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from qkcore.config import SniffConfig, parse_device_map
from qkcore.errors import QkcoreError
from qkcore.sweep import tasks
from qkcore.sweep.progress import Board, Event, event, line
from qkcore.sweep.runs import Run, load_runs
from qkcore.sweep.summary import RunReport
from qkcore.sweep.tasks import Outcome

PIP_COMMAND = "pip install 'qkcore[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or one line naming the pip command that installs it."""
    try:
        import ray
    except ImportError:
        raise QkcoreError(f"qkcore sweep runs on Ray, which is not installed: {PIP_COMMAND}") from None
    return ray


@dataclass(frozen=True)
class SweepOptions:
    """The options of ``qkcore sweep``."""

    address: str | None = None  # None: a local Ray in this process (unless this process already runs one)
    shards: int = 1
    max_retries: int = 3
    restart: bool = False


@dataclass
class _Pending:
    """A run's tasks in flight and what it did so far."""

    run: Run
    held: str
    started: float = field(default_factory=time.perf_counter)
    shards_left: int = 0


def run_sweep(paths: Sequence[str], options: SweepOptions, echo: Callable[[str], None] = print) -> list[RunReport]:
    """Run every config of ``paths`` as Ray tasks; return how each ended (in the order of the configs)."""
    ray = import_ray()
    runs = load_runs(paths)
    reports: dict[str, RunReport] = {}
    for run in runs:
        if run.error is not None:  # named before any task starts; the others still go
            echo(f"  {run.name}: failed: {run.error}")
            reports[run.name] = RunReport(run, "failed", message=run.error)
    started_ray = _connect(ray, options.address)
    try:
        with ExitStack() as stack:
            held = _hold_roots([r for r in runs if r.cfg is not None], options, stack, reports, echo)
            reports.update(_Scheduler(ray, options, echo).run(held))
    finally:
        if started_ray:
            ray.shutdown()
    return [reports[run.name] for run in runs]


def _connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at ``address``, or start Ray in this process; whether this call started it."""
    if address is None and ray.is_initialized():  # a program (or a test) that runs Ray already
        return False
    if address is None:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    else:
        ray.init(address=address, logging_level="WARNING")
    return True


def _hold_roots(
    runs: list[Run], options: SweepOptions, stack: ExitStack, reports: dict[str, RunReport], echo: Callable[[str], None]
) -> list[tuple[Run, str]]:
    """Lock every run's data root for the sweep (``--restart``: discard its staged work); a refused root fails its run."""
    from qkcore.output import command_line, open_output

    held = []
    for run in runs:
        assert run.cfg is not None
        try:
            root = open_output(run.cfg.output)
            root.check_usable()
            stack.callback(root.forget_if_unused)
            token = stack.enter_context(root.locked(command_line()))
            if options.restart:  # here, once: a retried task must not discard what it resumes
                root.discard_work()
        except QkcoreError as exc:
            echo(f"  {run.name}: failed: {exc}")
            reports[run.name] = RunReport(run, "failed", message=str(exc))
            continue
        held.append((run, token))
    return held


def gpus_for(cfg: SniffConfig, cluster_gpus: float) -> int:
    """GPUs a run's task asks for: ``inference.tensor_parallel_size`` for a CUDA run (``auto``: when the cluster has GPUs), else 0."""
    from qkcore.tensor_parallel import size_of

    try:
        device = parse_device_map(cfg.model.device_map)
    except ValueError:
        device = None
    cuda = cluster_gpus > 0 if device is None else device[0] == "cuda"
    return size_of(cfg) if cuda else 0


class _Scheduler:
    """Submit each run's tasks, follow them to the end, print a line per change of a run's status."""

    def __init__(self, ray: Any, options: SweepOptions, echo: Callable[[str], None]) -> None:
        self.ray, self.options, self.echo = ray, options, echo
        self.board = ray.remote(num_cpus=0)(Board).remote()
        self.cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        self.inflight: dict[Any, tuple[_Pending, str, int | None]] = {}  # ref -> (run, step, shard)
        self.reports: dict[str, RunReport] = {}
        self._shown: dict[tuple[str, int | None], str] = {}

    def _submit(self, pending: _Pending, step: str, fn: Callable[..., Outcome], *args: Any, shard: int | None = None) -> None:
        cfg = pending.run.cfg
        assert cfg is not None
        remote = self.ray.remote(fn).options(
            num_cpus=1, num_gpus=gpus_for(cfg, self.cluster_gpus),
            max_retries=self.options.max_retries, retry_exceptions=False,
        )
        ref = remote.remote(cfg, pending.run.name, pending.held, *args, board=self.board)
        self.inflight[ref] = (pending, step, shard)

    def run(self, held: list[tuple[Run, str]]) -> dict[str, RunReport]:
        """Run every held run to its end."""
        for run, token in held:
            pending = _Pending(run, token)
            self._show(event(run.name, None, "queued"))
            if self.options.shards > 1:
                self._submit(pending, "prepare", tasks.prepare_task, self.options.shards)
            else:
                self._submit(pending, "run", tasks.sniff_task)
        while self.inflight:
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=0.5)
            self._drain()
            for ref in ready:
                self._finished(ref)
        self._drain()
        return self.reports

    def pids(self) -> dict[tuple[str, int | None], int]:
        """The process running each run or shard (the board's latest report)."""
        return self.ray.get(self.board.pids.remote())

    def _finished(self, ref: Any) -> None:
        pending, step, shard = self.inflight.pop(ref)
        try:
            outcome: Outcome = self.ray.get(ref)
        except Exception as exc:  # the task raised (not retried), or its worker died more than --max-retries times
            message = _first_line(exc)
            self._end(pending, "error", message=message)
            return
        if outcome.status == "failed":
            self._end(pending, "failed", message=outcome.message)
        elif step == "prepare" and outcome.status == "shards":
            pending.shards_left = self.options.shards
            for index in range(self.options.shards):
                self._show(event(pending.run.name, index, "queued"))
                self._submit(pending, "shard", tasks.shard_task, index, self.options.shards, shard=index)
        elif step == "shard":
            pending.shards_left -= 1
            if pending.shards_left == 0:
                self._submit(pending, "finalize", tasks.finalize_task, self.options.shards)
        else:
            self._end(pending, "done", outcome.action, outcome.rows)

    def _end(self, pending: _Pending, status: Any, action: str = "", rows: int = 0, message: str = "") -> None:
        name = pending.run.name
        if name in self.reports:  # a second shard failing after the first: the run already ended
            return
        for ref, (other, _, _) in list(self.inflight.items()):  # the run's other shards are of no use now
            if other is pending:
                self.ray.cancel(ref, force=True)
                del self.inflight[ref]
        self.reports[name] = RunReport(pending.run, status, action, rows, time.perf_counter() - pending.started, message)
        if status != "done":
            self._show(Event(name, None, "failed", detail=message))

    def _drain(self) -> None:
        for e in self.ray.get(self.board.drain.remote()):
            self._show(e)

    def _show(self, e: Event) -> None:
        text = line(e)
        if self._shown.get((e.run, e.unit)) != text:
            self._shown[(e.run, e.unit)] = text
            self.echo(text)


def _first_line(exc: BaseException) -> str:
    """A task's failure in one line (Ray wraps the worker's traceback)."""
    cause = getattr(exc, "cause", None)
    text = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else f"{type(exc).__name__}: {exc}"
    return next((part.strip() for part in text.splitlines() if part.strip()), type(exc).__name__)
