"""What the sweep tests share: tiny run configs, the published files of a root, ``qkcore sweep`` in this process."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

from qkcore.cli import main
from qkcore.testing import TINY_LLAMA, write_run_config

#: The card's creation time (the wall clock of the run): masked where two runs are compared byte for byte.
CREATED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")


def texts(documents: int) -> list[tuple[str, str]]:
    """Documents of uneven lengths (so a batch formed differently would pad differently)."""
    return [(f"doc{i}", " ".join(f"w{i}x{j}" for j in range(8 + (i * 7) % 23))) for i in range(documents)]


def sweep_config(folder: Path, documents: int = 9, **sections: Any) -> Path:
    """A tiny-Llama run config in ``folder`` committing after every batch (a kill loses at most one)."""
    folder.mkdir(parents=True, exist_ok=True)
    sections.setdefault("inference", {"batch_size": 2})
    sections.setdefault("output", {})["commit_every_s"] = 0
    return write_run_config(folder, TINY_LLAMA, texts=texts(documents), **sections)


def published_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """A run's published files (repo path → bytes), with the card's creation time (the wall clock of the run) masked,
    in the card and, through the card's sha256, in ``qkcore.json``."""
    masked = dict(files)
    for name in ("README.md", "qkcore.json"):
        text = CREATED.sub("TIME", files[name].decode("utf-8"))
        masked[name] = re.sub(r'"card_sha256": "[0-9a-f]{64}"', '"card_sha256": "SHA"', text).encode()
    return masked


def published(root: Path) -> dict[str, bytes]:
    """:func:`published_files` of a local data root."""
    return published_files({p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
                            if p.is_file() and ".qkcore" not in p.parts})


def sweep_cli(*argv: str) -> tuple[int, str]:
    """``qkcore sweep ARGV`` in this process: (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["sweep", *argv])
    return code, out.getvalue()
