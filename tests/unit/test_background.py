"""The writer thread: order kept, errors surfaced, handed-over rows bounded by bytes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from qkcore.background import BackgroundWriter
from qkcore.writer import CapturedChunk


def _chunk(layer: int, rows: int = 10) -> CapturedChunk:
    return CapturedChunk(
        layer=layer, kind="q", heads=[0], example_ids=np.zeros(rows, np.int64), positions=np.arange(rows),
        buckets=np.zeros(rows, np.int64), vectors=np.zeros((1, rows, 25), np.float32), sliding_window=None,
    )  # 1000 bytes of vectors


class SlowWriter:
    """Records calls; each add waits until released, so the queue fills up."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.release = threading.Event()
        self.fail_on: int | None = None

    def add(self, chunk: CapturedChunk) -> None:
        self.release.wait(5)
        if chunk.layer == self.fail_on:
            raise OSError("disk full")
        self.calls.append(("add", chunk.layer))

    def commit(self, state: dict) -> None:
        self.calls.append(("commit", state["n"]))


def test_calls_run_in_order_and_commit_snapshots_state() -> None:
    writer = SlowWriter()
    writer.release.set()
    background = BackgroundWriter(writer, max_pending_bytes=10_000)
    state = {"n": 1}
    background.add(_chunk(0))
    background.commit(state)
    state["n"] = 2  # mutated after the commit was submitted
    background.add(_chunk(1))
    background.drain()
    background.stop()
    assert writer.calls == [("add", 0), ("commit", 1), ("add", 1)]


def test_pending_rows_are_bounded_by_bytes() -> None:
    writer = SlowWriter()
    background = BackgroundWriter(writer, max_pending_bytes=2_500)  # room for two 1000-byte chunks
    submitted = []

    def produce() -> None:
        for layer in range(5):
            background.add(_chunk(layer))
            submitted.append(layer)

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.3)
    assert len(submitted) == 2, "the producer must wait while 2 chunks are pending"
    writer.release.set()
    producer.join(5)
    background.drain()
    background.stop()
    assert submitted == list(range(5)) and [c[1] for c in writer.calls] == list(range(5))


def test_an_error_in_the_thread_reaches_the_caller_and_stops_later_work() -> None:
    writer = SlowWriter()
    writer.release.set()
    writer.fail_on = 1
    background = BackgroundWriter(writer, max_pending_bytes=10_000)
    for layer in range(3):
        try:
            background.add(_chunk(layer))
        except OSError:
            break
    with pytest.raises(OSError, match="disk full"):
        background.commit({"n": 9})
        background.drain()
    background.stop()
    assert ("commit", 9) not in writer.calls and ("add", 2) not in writer.calls
