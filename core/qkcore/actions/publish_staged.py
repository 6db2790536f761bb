"""The ``publish`` action: this run finished (its files wait in the final folder) but was not fully published."""

from __future__ import annotations

import structlog

from qkcore.actions.context import RunContext
from qkcore.run_state import SniffResult
from qkcore.stages.capture import open_writer, resumed_state
from qkcore.writer import read_journal

log = structlog.get_logger(__name__)


def publish_staged(ctx: RunContext) -> SniffResult:
    """Publish the finished run (from its journal, or from a ``publishing`` record), then push."""
    root = ctx.root
    journal = read_journal(root.staging_dir)
    if journal is None:  # the record says "publishing" and its journal is gone: the record has everything
        record = root.read_record()
        assert record is not None
        log.info("resuming the publish of a finished run", run=record.run_key)
        record = root.publish(record)
        if ctx.hub is not None:
            record = ctx.push(record)
        return ctx.result(record, "published")
    writer = open_writer(ctx.cfg, root.staging_dir, str(journal["run_key"]))
    state = resumed_state(writer)
    assert state is not None
    log.info("resuming the publish of a finished run", run=state.run_key)
    record = ctx.publish_and_push(state, writer)
    return ctx.result(record, "published")
