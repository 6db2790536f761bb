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
        # Read by huggingface_hub, transformers and datasets when they are imported, which the
        # CLI does after this (see library_bars_off for the one bar they draw without a switch).
        for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
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
    """Silence the progress bar transformers draws with tqdm itself while dequantizing a GGUF (no switch of its own),
    when library bars are off (not a terminal, ``--quiet``, ``--json-logs``)."""
    if _state["library_bars"]:
        yield
        return
    from functools import partial
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    with mock.patch.object(gguf_utils, "tqdm", partial(gguf_utils.tqdm, disable=True)):
        yield
