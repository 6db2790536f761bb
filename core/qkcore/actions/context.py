"""What every action of ``qkcore sniff`` is given, and the steps they share (publish and push, the result)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pluggy
import structlog

from qkcore.config import SniffConfig
from qkcore.distributed import Ranks
from qkcore.hub import HubSync
from qkcore.stages.capture import CommitHook
from qkcore.output import DataRoot, Record
from qkcore.run_state import Action, RunState, RunSummary, SniffResult
from qkcore.stages.publish import publish
from qkcore.stages.push import hub_target, push
from qkcore.writer import DatasetWriter

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ShardedRun:
    """The part of a ``qkcore sweep --shards K`` run that one ``run_sniff`` call does."""

    count: int  # K: shard i owns batch b when b % K == i (:meth:`qkcore.distributed.Ranks.shard`)
    finalize: bool  # False: apply the rule only (the shards capture next); True: merge the shards and publish


@dataclass(frozen=True)
class RunContext:
    """One ``qkcore sniff`` holding the data root's lock: its config, plugins, root, ranks and Hub target."""

    cfg: SniffConfig
    pm: pluggy.PluginManager
    root: DataRoot
    ranks: Ranks
    hub: HubSync | None
    started: float = field(default_factory=time.perf_counter)
    #: Seconds from ``started`` to the end of named steps, for the result (see :attr:`SniffResult.seconds`).
    seconds: dict[str, float] = field(default_factory=dict)
    #: ``qkcore sweep --shards K``: the run's documents are captured by K shard tasks; this
    #: process prepares (the rule) or finalizes (merge, finish, publish, push) it.
    shards: ShardedRun | None = None
    #: Called after each commit of the capture (a sweep reports progress with it).
    on_commit: CommitHook | None = None

    def mark(self, step: str) -> None:
        """Note that ``step`` ended now."""
        self.seconds[step] = time.perf_counter() - self.started

    def push(self, record: Record) -> Record:
        """Push the published files of ``record`` to the Hub target; the record notes the commit."""
        assert self.hub is not None
        return push(self.root, record, self.hub, f"qkcore: {record.summary.model} (run {record.run_key})")

    def publish_and_push(self, state: RunState, writer: DatasetWriter) -> Record:
        """Publish a ``finalized`` state's files into the root, drop its staging, then push when there is a Hub target.

        The staging goes before the push: a failed push leaves a complete, unpushed root
        that the next run (or ``qkcore push``) pushes.
        """
        record = publish(self.root, state, None if self.hub is None else hub_target(self.hub))
        writer.discard()
        log.info("capture written", data_root=self.root.location, configs=len(record.files) - 2,
                 documents=state.documents, tokens=state.tokens, seconds=round(time.perf_counter() - self.started, 2))
        if self.hub is not None:
            record = self.push(record)
        return record

    def result(self, record: Record, action: Action) -> SniffResult:
        """What the run did, with the rows the root's manifest now lists."""
        manifest = self.root.read_manifest()
        rows = {name: s.rows for name, s in manifest.configs.items()} if manifest else {}
        return SniffResult(self.cfg.output.data_root, rows, record.summary, action, dict(self.seconds))

    def share_result(self, state: RunState | None, action: Action) -> SniffResult:
        """A torchrun rank > 0's result: its own share (it publishes nothing)."""
        summary = RunSummary() if state is None else RunSummary(documents=state.documents, tokens=state.tokens)
        return SniffResult(self.cfg.output.data_root, {}, summary, action, dict(self.seconds))
