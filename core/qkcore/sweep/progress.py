"""What the tasks of a sweep report, and the console line each run shows.

:class:`Board` collects :class:`Event`\\ s; the driver runs it as a Ray actor (tasks on
any machine report to it) and prints a line for each run whose status changed
(:func:`line`). A shard's worker reports its process id, so a test (or a person) can
tell which process runs which shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

Status = Literal["queued", "capturing", "publishing", "done", "failed", "skipped"]


@dataclass(frozen=True)
class Event:
    """One report: ``run`` (config path), ``unit`` (``None`` for the run, else the shard's number), status and counts."""

    run: str
    unit: int | None
    status: Status
    documents: int = 0
    of: int | None = None
    pid: int = 0
    detail: str = ""


class Board:
    """The events of a sweep, in arrival order (the driver drains them), and the latest process per unit."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._pids: dict[tuple[str, int | None], int] = {}

    def report(self, event: Event) -> None:
        """Record ``event``."""
        self._events.append(event)
        if event.pid:
            self._pids[(event.run, event.unit)] = event.pid

    def drain(self) -> list[Event]:
        """The events since the last call."""
        events, self._events = self._events, []
        return events

    def pids(self) -> dict[tuple[str, int | None], int]:
        """The process that last reported for each ``(run, unit)``."""
        return dict(self._pids)


def event(run: str, unit: int | None, status: Status, documents: int = 0, of: int | None = None, detail: str = "") -> Event:
    """An :class:`Event` from this process."""
    return Event(run, unit, status, documents, of, os.getpid(), detail)


def line(e: Event) -> str:
    """The console line of ``e``: ``RUN [shard i]: status n/m documents (pid P)``."""
    who = e.run if e.unit is None else f"{e.run} [shard {e.unit}]"
    what = e.status
    if e.status == "capturing" and (e.documents or e.of is not None):
        what += f" {e.documents}/{'?' if e.of is None else e.of} documents"
    if e.detail:
        what += f": {e.detail}"
    pid = f" (pid {e.pid})" if e.pid and e.status in ("capturing", "publishing") else ""
    return f"  {who}: {what}{pid}"
