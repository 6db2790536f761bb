"""``journal.json``: the last commit of a staging folder, and what a resume may take from it.

The journal lists the committed part files, the next part number, every config's
head_dim and sliding window, the caller's ``state`` and the ``run_key`` of the run that
wrote it. It is rewritten durably (:mod:`qkcore.fsutil`) at each commit, so a crash
leaves the previous commit or the new one. Parts written after the last commit are not
listed: a resume deletes them (:func:`resume`) and the caller re-adds those rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkcore.errors import QkcoreError
from qkcore.fsutil import remove_tree, write_text_durably

JOURNAL_FILE = "journal.json"
_FORMAT = 1

ConfigMeta = tuple[int, int | None]  # (head_dim, sliding_window) of one config


class StagingConflict(QkcoreError, ValueError):
    """The staging directory holds an unfinished run that this writer cannot resume.

    ``staged_run_key`` and ``staged_state`` describe what is there (``None`` when unreadable),
    so the caller can say how it differs from the run it wanted.
    """

    def __init__(self, message: str, staged_run_key: str | None = None, staged_state: Any = None) -> None:
        super().__init__(message)
        self.staged_run_key = staged_run_key
        self.staged_state = staged_state


@dataclass
class Journal:
    """One commit: the parts it holds, the configs it saw and the caller's state."""

    run_key: str | None
    parts: list[str]
    next_part: int
    configs: dict[str, ConfigMeta]
    state: Any

    def write(self, staging_dir: Path) -> None:
        """Write this commit as ``staging_dir/journal.json``, durably."""
        journal = {
            "format": _FORMAT,
            "run_key": self.run_key,
            "parts": self.parts,
            "next_part": self.next_part,
            "configs": {
                name: {"head_dim": head_dim, "sliding_window": sliding_window}
                for name, (head_dim, sliding_window) in sorted(self.configs.items())
            },
            "state": self.state,
        }
        write_text_durably(staging_dir / JOURNAL_FILE, json.dumps(journal, indent=1, sort_keys=True))


def read_journal(staging_dir: Path | str) -> dict[str, Any] | None:
    """The committed journal of a staging directory (``run_key``, ``state``, ...), or ``None``.

    An unreadable journal raises :class:`StagingConflict`: it is not silently treated as absent.
    """
    path = Path(staging_dir) / JOURNAL_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        journal = json.loads(text)
        if not isinstance(journal, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise StagingConflict(f"{path} is unreadable ({exc}); rerun with --restart to discard the staged progress") from None
    return journal


def staged_journal(staging_dir: Path, *, restart: bool = False) -> dict[str, Any] | None:
    """The committed journal of a data root's staging folder, as the rule reads it; ``None`` if nothing is committed.

    A staging folder without a journal holds nothing committed (killed before its first
    commit, or emptied): it is removed. An unreadable journal raises
    :class:`StagingConflict` naming ``--restart``; under ``restart`` it is ``None`` and
    left in place instead, since ``--restart`` discards staging once the rule has let
    the run go ahead (a refused run leaves it as it was).
    """
    if not staging_dir.exists():
        return None
    try:
        journal = read_journal(staging_dir)
    except StagingConflict:
        if restart:
            return None
        raise
    if journal is None:
        remove_tree(staging_dir)
    return journal


def resume(staging_dir: Path, run_key: str | None) -> Journal:
    """The commit in ``staging_dir`` that the run ``run_key`` resumes; everything it does not list is deleted.

    Raises :class:`StagingConflict` if the journal is unreadable, was written by another
    run (or ``run_key`` is ``None``), or lists a part that is gone.
    """
    journal = read_journal(staging_dir)
    assert journal is not None  # called only when the journal file exists
    try:
        parts, configs = list(journal["parts"]), dict(journal["configs"])
        ok = journal.get("format") == _FORMAT
    except (KeyError, TypeError) as exc:
        raise StagingConflict(f"{staging_dir} holds an unreadable journal (no {exc})") from exc
    staged_key, staged_state = journal.get("run_key"), journal.get("state")
    if not ok or run_key is None or staged_key != run_key:
        raise StagingConflict(
            f"{staging_dir} holds an unfinished run whose configuration differs from this "
            f"one (run_key {staged_key!r}, this run {run_key!r})",
            staged_key,
            staged_state,
        )
    missing = [p for p in parts if not (staging_dir / p).is_file()]
    if missing:
        raise StagingConflict(
            f"{staging_dir} is incomplete (missing {', '.join(missing[:3])})", staged_key, staged_state
        )
    keep = {JOURNAL_FILE, *parts}
    for entry in staging_dir.iterdir():  # parts written after the last commit, temp files
        if entry.name not in keep:
            remove_tree(entry) if entry.is_dir() else entry.unlink()
    return Journal(
        run_key=staged_key,
        parts=parts,
        next_part=int(journal["next_part"]),
        configs={name: (int(meta["head_dim"]), meta["sliding_window"]) for name, meta in configs.items()},
        state=journal["state"],
    )


def committed_parts(staging_dir: Path) -> tuple[dict[str, ConfigMeta], list[str]]:
    """The configs and part files committed in another writer's staging (a torchrun rank's), for adoption."""
    journal = json.loads((staging_dir / JOURNAL_FILE).read_text(encoding="utf-8"))
    configs = {name: (int(meta["head_dim"]), meta["sliding_window"]) for name, meta in journal["configs"].items()}
    return configs, list(journal["parts"])
