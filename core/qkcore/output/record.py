"""The record of a data root (``run.json``): which run its published files belong to, and those files.

Backend-neutral: every :class:`~qkcore.output.protocol.DataRoot` keeps one
:class:`Record`, whatever it stores the files on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qkcore.errors import QkcoreError
from qkcore.fsutil import sha256_file
from qkcore.layout import CARD_FILE, MANIFEST_FILE

if TYPE_CHECKING:
    from qkcore.output.protocol import DataRoot

RECORD_FILE = "run.json"
_RECORD_FORMAT = 1


class UnreadableRecord(QkcoreError):
    """``run.json`` is there but cannot be read: nothing says which run the root's files are.

    ``reason`` names the file and what is wrong with it; the message adds the way out.
    The rule (:mod:`qkcore.root_policy`) treats such a root like files no run recorded.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"{reason}; qkcore cannot tell which run this data root holds: rerun `qkcore sniff` with --replace "
            "to capture the run over it (its files are replaced only when that run finishes)"
        )
        self.reason = reason


@dataclass(frozen=True)
class FileEntry:
    """One published file as recorded: size and sha256 (what "unchanged" compares), and its modification time."""

    size: int
    sha256: str
    mtime_ns: int = 0


@dataclass
class Record:
    """``run.json``: the run whose files the data root publishes."""

    state: Literal["publishing", "complete"]
    run_key: str
    identity: dict[str, Any]
    files: dict[str, FileEntry]  # repo path -> entry, every published file (card and manifest included)
    summary: dict[str, Any] = field(default_factory=dict)  # model, created, documents, tokens
    hub: dict[str, Any] | None = None  # {"repo", "branch", "pushed_commit"} when the run has a Hub target

    def describe(self) -> str:
        """One phrase naming the run for messages: key, model, size, date."""
        model = self.summary.get("model") or "unknown model"
        created = self.summary.get("created") or "unknown date"
        configs = sum(1 for name in self.files if name not in (CARD_FILE, MANIFEST_FILE))
        return f"run {self.run_key} ({model}, {configs} configs, created {created})"

    @property
    def pushed(self) -> bool:
        """Whether the files were pushed to the Hub target they were captured for."""
        return bool(self.hub and self.hub.get("pushed_commit"))

    def to_json(self) -> str:
        """The record as ``run.json`` holds it."""
        data = asdict(self)
        data["format"] = _RECORD_FORMAT
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path | str) -> Record:
        """Parse ``run.json`` read from ``where``; an unreadable one raises :class:`UnreadableRecord` naming it."""
        try:
            data = json.loads(text)
            if data.get("format") != _RECORD_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            return cls(
                state=data["state"],
                run_key=data["run_key"],
                identity=data.get("identity") or {},
                files={name: FileEntry(**entry) for name, entry in data["files"].items()},
                summary=data.get("summary") or {},
                hub=data.get("hub"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UnreadableRecord(f"{where} is unreadable ({exc})") from None


def file_entry(path: Path) -> FileEntry:
    """The :class:`FileEntry` of a local file (reads it to hash it)."""
    stat = path.stat()
    return FileEntry(size=stat.st_size, sha256=sha256_file(path), mtime_ns=stat.st_mtime_ns)


def readable_record(root: DataRoot) -> tuple[Record | None, UnreadableRecord | None]:
    """The root's record and ``None``, or ``(None, why)`` when ``run.json`` is there but unreadable."""
    try:
        return root.read_record(), None
    except UnreadableRecord as exc:
        return None, exc
