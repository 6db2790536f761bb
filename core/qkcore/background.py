"""Writing rows off the main thread, so spills and commits never stall the forward pass.

:class:`BackgroundWriter` runs a :class:`~qkcore.writer.DatasetWriter`'s ``add`` and
``commit`` on one worker thread, in submission order. Rows handed over but not yet
added are bounded by bytes (``max_pending_bytes``, the run uses
``output.flush_threshold_mb``): when the writer falls behind, the capture loop
waits instead of piling rows up, so captured rows in host RAM stay within about
twice the flush threshold (the writer's buffer plus this queue).
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any, Callable

from qkcore.writer import CapturedChunk, DatasetWriter


class BackgroundWriter:
    """Ordered ``add``/``commit`` on a worker thread; errors surface on the next call or :meth:`drain`."""

    def __init__(
        self, writer: DatasetWriter, max_pending_bytes: int, after_commit: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        """``after_commit(state)`` runs on the worker thread after each commit (a sweep shard uploads its staging there)."""
        self.writer = writer
        self._after_commit = after_commit
        self._limit = max_pending_bytes
        self._pending = 0
        self._room = threading.Condition()
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="qkcore-writer", daemon=True)
        self._thread.start()

    def add(self, chunk: CapturedChunk) -> None:
        size = int(chunk.vectors.nbytes)
        with self._room:
            # One chunk larger than the limit still goes through, alone.
            while self._pending and self._pending + size > self._limit and self._error is None:
                self._room.wait()
            self._pending += size
        self._submit(self._add, chunk, size)

    def commit(self, state: dict[str, Any]) -> None:
        # Snapshot now: the caller keeps mutating its state while the commit waits its turn.
        self._submit(self._commit, json.loads(json.dumps(state)))

    def drain(self) -> None:
        """Wait until every submitted call ran; raise the first error any of them raised."""
        self._queue.join()
        self._raise()

    def stop(self) -> None:
        """Finish the queued work and end the thread (errors are kept for :meth:`drain`)."""
        self._queue.put(None)
        self._thread.join()

    def _commit(self, state: dict[str, Any]) -> None:
        self.writer.commit(state)
        if self._after_commit is not None:
            self._after_commit(state)

    def _add(self, chunk: CapturedChunk, size: int) -> None:
        try:
            self.writer.add(chunk)
        finally:
            with self._room:
                self._pending -= size
                self._room.notify_all()

    def _submit(self, call: Callable[..., Any], *args: Any) -> None:
        self._raise()
        self._queue.put((call, args))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            call, args = item
            try:
                if self._error is None:  # after a failure, skip the rest: nothing half-committed
                    call(*args)
            except BaseException as exc:  # handed to the main thread
                with self._room:
                    self._error = exc
                    self._room.notify_all()
            finally:
                self._queue.task_done()
        self._queue.task_done()
