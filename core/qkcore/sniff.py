"""``qkcore sniff``: one capture run, from its checks to its published files.

The order is the point: nothing is written before everything that can fail early has
been checked, and nothing published changes before the new run is complete.

====  =============================================================  ==============================
step  what                                                           where
====  =============================================================  ==============================
1     config checks (sampler, what to capture): no I/O               ``stages/load.py``
2     the data root: usable, locked (one process per root)           ``output/``
3     inputs: documents checked, tokenizer, architecture, plugin,    ``stages/load.py``,
      and the run's identity                                         ``identity.py``
4     the Hub branch when configured: token, what it holds           ``hub.py``
5     the rule: complete / pull / publish / resume / fresh, or       ``root_policy.py``
      refuse; then what it says to discard is discarded
6     the action the rule chose, which calls the stages: load the    ``actions/``, ``stages/``
      weights, plan, capture, merge, finish, publish, push
====  =============================================================  ==============================

:func:`run_sniff` is the executor for one process and for each torchrun rank (every
rank calls it; rank 0 reads the root and decides, and hands the decision to the
others). :func:`run_push` is ``qkcore push``.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from typing import Any, Callable, TypeVar

import pluggy
import structlog

from qkcore import tensor_parallel
from qkcore.actions.capture import capture
from qkcore.actions.complete import already_complete
from qkcore.actions.context import RunContext, ShardedRun
from qkcore.actions.publish_staged import publish_staged
from qkcore.actions.pull import pull
from qkcore.config import ConfigError, SniffConfig
from qkcore.distributed import Ranks, init_ranks, shutdown
from qkcore.errors import QkcoreError
from qkcore.fsutil import remove_tree
from qkcore.hub import BranchState, HubSync, hub_sync
from qkcore.output import DataRoot, Record, command_line, open_output, readable_record
from qkcore.plugins import make_plugin_manager
from qkcore.root_policy import Decision, RootView, changed_files_message, check_branch, decide
from qkcore.run_state import RunState, RunSummary, SniffResult
from qkcore.samplers import Sampler
from qkcore.stages.capture import CommitHook, Sniffer, capture_unit
from qkcore.stages.load import HashCache, RunInputs, check_config, load_inputs, load_weights
from qkcore.stages.push import branch_view, push
from qkcore.staging.journal import staged_journal
from qkcore.writer import read_journal

__all__ = ["HELD_LOCK_ENV", "ShardedRun", "SniffResult", "run_push", "run_shard", "run_sniff"]

log = structlog.get_logger(__name__)

#: The environment variable that hands a ``qkcore sweep``'s lock token to a ``qkcore sniff`` it
#: starts in another process (a run with tensor_parallel_size > 1 runs under torchrun).
HELD_LOCK_ENV = "QKCORE_HELD_LOCK"

T = TypeVar("T")


def run_sniff(
    cfg: SniffConfig,
    pm: pluggy.PluginManager | None = None,
    hub_api: Any = None,
    restart: bool = False,
    replace: bool = False,
    *,
    held: str | None = None,
    shards: ShardedRun | None = None,
    on_commit: CommitHook | None = None,
) -> SniffResult:
    """Run the capture ``cfg`` describes into its data root, by the rule of :mod:`qkcore.root_policy`.

    ``restart`` discards staged progress; ``replace`` lets this run replace another run's
    files (and its Hub branch) when it publishes. Under torchrun every rank calls this.

    A ``qkcore sweep`` holds the root's lock itself and runs this in its tasks: ``held``
    is its lock's token (default: ``$QKCORE_HELD_LOCK``), checked instead of taking the
    lock; ``shards`` says this call is the prepare or the finalize of a ``--shards K``
    run (:class:`~qkcore.actions.context.ShardedRun`); ``on_commit`` runs after every
    commit of the capture.
    """
    started = time.perf_counter()
    held = held if held is not None else os.environ.get(HELD_LOCK_ENV) or None
    ranks = init_ranks()
    structlog.contextvars.bind_contextvars(rank=ranks.rank)
    try:
        ranks = tensor_parallel.with_groups(ranks, cfg)  # issue 19: K checked before anything else
        if shards is not None and (ranks.distributed or ranks.tensor_parallel_size > 1):
            raise QkcoreError(f"{cfg.source or '<config>'}: --shards runs each shard in one process; "
                              "inference.tensor_parallel_size must be 1 (or run without --shards)")
        pm = pm or make_plugin_manager()
        sampler = check_config(cfg, pm)  # before the data root is touched
        root = open_output(cfg.output)
        with ExitStack() as stack:
            if ranks.is_main:
                stack.callback(root.forget_if_unused)

            def lock() -> None:
                root.check_usable()
                stack.enter_context(root.locked(command_line(), held=held))

            _agree(ranks, lock)
            ctx = RunContext(cfg, pm, root, ranks, hub_sync(cfg.output, api=hub_api), started,
                             shards=shards, on_commit=on_commit)
            return _dispatch(ctx, sampler, restart=restart, replace=replace)
    finally:
        shutdown(ranks)


def _agree(ranks: Ranks, step: Callable[[], T]) -> T:
    """Run ``step`` on rank 0 and hand its result, or its error, to every rank (no rank waits forever)."""
    if not ranks.distributed:
        return step()
    outcome: tuple[str, Any] = ("ok", None)
    if ranks.is_main:
        try:
            outcome = ("ok", step())
        except (QkcoreError, ConfigError) as exc:
            outcome = ("error", str(exc))
        except BaseException as exc:
            ranks.broadcast(("error", f"rank 0 failed: {type(exc).__name__}: {exc}"))
            raise
    outcome = ranks.broadcast(outcome)
    if outcome[0] == "error":
        raise QkcoreError(outcome[1])
    return outcome[1]


def _dispatch(ctx: RunContext, sampler: Sampler, *, restart: bool, replace: bool) -> SniffResult:
    """Load the inputs, apply the rule on rank 0, and run the action it chose."""
    cache = HashCache(ctx.root.work_dir / "hashes.json")
    inputs = load_inputs(ctx.cfg, ctx.pm, ctx.ranks, cache.values, sampler)
    structlog.contextvars.bind_contextvars(run_key=inputs.run_key)  # the card's name for this run, on every line
    if ctx.ranks.is_main:
        cache.save()
    branch: list[BranchState] = []  # rank 0's preflight of the Hub branch, for a pull

    def rule() -> tuple[Decision, bool]:
        view = read_root(ctx.root, inputs.run_key, restart=restart)
        state = ctx.hub.preflight() if ctx.hub is not None else None
        branch.extend([state] if state is not None else [])
        world_size = ctx.ranks.world_size if ctx.shards is None else ctx.shards.count
        decision = decide(
            view, inputs.identity, restart=restart, replace=replace, world_size=world_size,
            branch=None if ctx.hub is None or state is None else branch_view(ctx.hub, state),
        )
        if decision.discard_staged or restart:
            ctx.root.discard_work()
            return decision, False
        if view.staged is None:  # a staging folder without a journal holds nothing committed (killed early, or emptied)
            remove_tree(ctx.root.staging_dir)
        merged = view.staged is not None and view.staged.phase in ("captured", "finalized")
        return decision, merged

    decision, merged = _agree(ctx.ranks, rule)
    for note in decision.notes:
        log.warning(note)
    if not ctx.ranks.is_main and decision.action in ("complete", "pull", "publish"):
        return ctx.share_result(None, _DONE[decision.action])
    if decision.action == "complete":
        return already_complete(ctx)
    if decision.action == "pull":
        return pull(ctx, inputs.identity, branch[0])
    if decision.action == "publish":
        return publish_staged(ctx)
    if ctx.shards is not None and not ctx.shards.finalize and not merged:  # the shard tasks capture next
        return SniffResult(ctx.cfg.output.data_root, {}, RunSummary(), "shards to capture", dict(ctx.seconds))
    return capture(ctx, inputs, decision, merged)


#: What a rank > 0 reports for an action rank 0 carries out alone.
_DONE = {"complete": "already complete", "pull": "pulled", "publish": "published"}


def read_root(root: DataRoot, run_key: str, *, restart: bool) -> RootView:
    """What the rule needs of the root: its record, published files, staged work and the quick check; reads only.

    With ``restart`` the staged state is not parsed (it is discarded, readable or not). An
    unreadable ``run.json`` is reported in the view (the rule treats it like unrecorded files);
    the files are checked against the record only when it is this run's (``run_key``).
    """
    staged = staged_journal(root.staging_dir, restart=restart)
    record, unreadable = readable_record(root)
    staged_ranks = root.staged_ranks()
    ranks_key, ranks_world_size = None, None
    if staged_ranks and not restart:  # --restart discards them, readable or not
        first = read_journal(root.rank_staging(staged_ranks[0])) or {}
        ranks_key = first.get("run_key")
        state = first.get("state")
        if isinstance(state, dict) and isinstance(state.get("world_size"), int):
            ranks_world_size = state["world_size"]
    return RootView(
        path=root.location,
        record=record,
        dataset_files=tuple(root.dataset_files()),
        staged=None if staged is None or restart else _staged_state(root, staged),
        ranks=tuple(staged_ranks),
        ranks_run_key=ranks_key,
        ranks_world_size=ranks_world_size,
        problems=tuple(root.verify(record)) if record and record.state == "complete" and record.run_key == run_key else (),
        unreadable_record=None if unreadable is None else unreadable.reason,
    )


def _staged_state(root: DataRoot, journal: dict[str, Any]) -> RunState:
    try:
        return RunState.from_json(journal.get("state"))
    except ValueError as exc:
        raise QkcoreError(f"{root.staging_dir}: the journal's state is unreadable ({exc}); "
                          "rerun with --restart to discard the staged progress") from None


def run_push(cfg: SniffConfig, hub_api: Any = None, replace: bool = False) -> Record:
    """``qkcore push``: upload a data root's complete run to its Hub branch (e.g. after a failed push).

    Refuses a root whose record is missing, half-published, or does not match its files
    (the sniff's own check of "unchanged": :meth:`~qkcore.output.protocol.DataRoot.verify`),
    and a branch that holds another run unless ``replace``.
    """
    hub = hub_sync(cfg.output, api=hub_api)
    if hub is None:
        raise QkcoreError(f"{cfg.source or '<config>'}: output.hf_repo_id is not set; nothing to push to")
    root = open_output(cfg.output)
    if not root.has_state():
        raise QkcoreError(f"output.data_root: {root.location} holds no qkcore run; nothing to push")
    with root.locked(command_line()):
        record = root.read_record()
        if record is None:
            raise QkcoreError(f"output.data_root: {root.location} holds no finished qkcore run; nothing to push")
        if record.state != "complete":
            raise QkcoreError(
                f"{root.location} is half-way through publishing {record.describe()}: rerun `qkcore sniff --config "
                f"{cfg.source or 'FILE'}` to finish it, then push"
            )
        problems = root.verify(record)  # the same check as the sniff's "already complete"
        if problems:
            raise QkcoreError(changed_files_message(root.location, record, problems, "nothing was pushed"))
        check_branch(branch_view(hub, hub.preflight()), record.run_key, replace)
        record = push(root, record, hub, f"qkcore push: {record.summary.model} (run {record.run_key})")
        log.info("pushed", run=record.run_key, target=hub.where, commit=record.hub.pushed_commit if record.hub else None)
        return record


def run_shard(
    cfg: SniffConfig, shard: int, shards: int, *, held: str, pm: pluggy.PluginManager | None = None,
    on_commit: CommitHook | None = None,
) -> RunState:
    """Capture shard ``shard`` of ``shards`` of a ``qkcore sweep --shards`` run into ``root.rank_staging(shard)``.

    The sweep holds the root (``held``: its lock token) and applied the rule before any
    shard started (:class:`ShardedRun` prepare). The shard resumes from its last commit
    (:meth:`~qkcore.output.protocol.DataRoot.load_staged` first), makes every commit
    visible to the finalize (:meth:`~qkcore.output.protocol.DataRoot.save_staged`), and
    returns its committed state (phase ``captured``).
    """
    ranks = Ranks.shard(shard, shards)
    with structlog.contextvars.bound_contextvars(shard=shard):  # unbound after: a worker runs other tasks next
        return _capture_shard(cfg, ranks, held=held, pm=pm, on_commit=on_commit)


def _capture_shard(
    cfg: SniffConfig, ranks: Ranks, *, held: str, pm: pluggy.PluginManager | None, on_commit: CommitHook | None,
) -> RunState:
    shard, shards = ranks.rank, ranks.world_size
    pm = pm or make_plugin_manager()
    sampler = check_config(cfg, pm)
    root = open_output(cfg.output)
    with root.locked(command_line(), held=held):
        inputs = load_inputs(cfg, pm, ranks, HashCache(root.work_dir / "hashes.json").values, sampler)
        staging = root.rank_staging(shard)
        root.load_staged(shard)
        journal = read_journal(staging)
        if journal is not None and journal.get("run_key") != inputs.run_key:  # the prepare step refused or discarded these
            raise QkcoreError(f"{staging}: staged by run {journal.get('run_key')}, not this run ({inputs.run_key}); "
                              "rerun the sweep with --restart to discard it")
        sniffer = Sniffer(inputs, load_weights(inputs, ranks), ranks)

        def committed(state: dict[str, Any], share: int | None) -> None:
            root.save_staged(shard)
            if on_commit is not None:
                on_commit(state, share)

        writer, state = capture_unit(sniffer, staging, RunState(inputs.identity, shards), whole_run=False,
                                     on_commit=committed)
        writer.abort()  # the state is committed; release the writer's buffers
        # Not a repeat of the last commit's hook: a shard killed between a commit and its upload resumes
        # here as captured, with no commit (and no hook) left to upload it.
        root.save_staged(shard)
        return state
