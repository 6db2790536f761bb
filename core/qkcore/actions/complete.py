"""The ``complete`` action: the root already publishes this run, unchanged; push it if it never was."""

from __future__ import annotations

import structlog

from qkcore.actions.context import RunContext
from qkcore.run_state import SniffResult

log = structlog.get_logger(__name__)


def already_complete(ctx: RunContext) -> SniffResult:
    """Nothing to capture; a run with a Hub target it was never pushed to is pushed now."""
    record = ctx.root.read_record()
    assert record is not None
    log.info("already complete: the files of this run are unchanged; nothing to do", data_root=ctx.root.location)
    hub = ctx.hub
    if hub is not None and not (record.hub is not None and record.hub.is_pushed_to(hub.repo_id, hub.branch)):
        log.info("pushing: this run was never pushed to its Hub branch", target=hub.where)
        record = ctx.push(record)
    return ctx.result(record, "already complete")
