"""Console output: log lines above one live progress line, or JSON lines for machines.

* Log lines (structlog, ``key=value``) go to stderr through ``tqdm.write``, so they print
  above the live progress bar instead of breaking it into frozen copies.
* The progress bar shows only on a terminal (and not with ``--quiet`` or ``--json-logs``);
  without it, the run logs a progress line at each commit instead, and the libraries' own
  bars (transformers loading weights, datasets reading files) are switched off too.
* Levels: ``--quiet`` shows warnings and errors, the default shows info (steps, commits,
  warnings), ``--debug`` (or ``inference.debug_logging``) adds a line per batch.
* ``--json-logs`` writes one JSON object per line (no bar), for log collectors.

The run key (the card's name for the run) is bound to every line once known, so two runs in one log can be told apart.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO

import structlog

_state = {"progress": True, "library_bars": True}


class _AboveProgress:
    """A stderr that writes whole lines through ``tqdm.write`` (above any live bar)."""

    def __init__(self) -> None:
        self._pending = ""

    def write(self, text: str) -> int:
        from tqdm import tqdm

        self._pending += text
        while "\n" in self._pending:
            line, self._pending = self._pending.split("\n", 1)
            tqdm.write(line, file=sys.stderr)  # resolved per line: pytest and redirects replace it
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(debug: bool = False, *, quiet: bool = False, json: bool = False) -> None:
    """Configure structlog for this process.

    A run is named in log lines by its run key (as in the card and ``qkcore.json``), which
    ``qkcore sniff`` binds once it is known; there is no other run id.
    """
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    _state["progress"] = not (quiet or json)
    _state["library_bars"] = not (quiet or json or not sys.stderr.isatty())
    if not _state["library_bars"]:
        # The libraries' own switches, read when they are imported, which the CLI does after
        # this: huggingface_hub's and datasets' (transformers follows huggingface_hub's), and
        # tqdm's own for the one bar transformers draws with tqdm directly (GGUF dequantizing).
        # Our own bars pass ``disable=`` explicitly, which TQDM_DISABLE does not override.
        for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
            os.environ.setdefault(variable, "1")
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)

    def logger_factory(*args: Any) -> structlog.PrintLogger:
        stream: TextIO | _AboveProgress = sys.stderr if json else _AboveProgress()
        return structlog.PrintLogger(file=stream)  # type: ignore[arg-type]

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )


def progress_disable() -> bool | None:
    """tqdm's ``disable`` for progress bars: ``None`` lets tqdm decide (a bar on a terminal only), ``True`` never."""
    return None if _state["progress"] else True


@contextmanager
def library_bars_off() -> Iterator[None]:
    """Switch transformers' progress bars off inside the block (its own switch, restored after),
    when library bars are off (not a terminal, ``--quiet``, ``--json-logs``).

    For a library imported before :func:`configure_logging` ran (in-process callers), where
    the environment switches it sets come too late.
    """
    if _state["library_bars"]:
        yield
        return
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
