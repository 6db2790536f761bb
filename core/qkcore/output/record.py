"""The record of a data root (``run.json``): which run its published files belong to, and those files.

Backend-neutral: every :class:`~qkcore.output.protocol.DataRoot` keeps one
:class:`Record`, whatever it stores the files on. Its parts are the run-state types of
:mod:`qkcore.run_state`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

from qkcore.errors import QkcoreError
from qkcore.fsutil import sha256_file
from qkcore.layout import CARD_FILE, MANIFEST_FILE
from qkcore.run_state import HubTarget, PublishedFile, RunIdentity, RunSummary, files_from_json, files_to_json

RECORD_FILE = "run.json"
_RECORD_FORMAT = 1

#: The name this type had before :class:`~qkcore.run_state.PublishedFile` (one type for a published file).
FileEntry = PublishedFile


@dataclass(frozen=True)
class Record:
    """``run.json``: the run whose files the data root publishes."""

    state: Literal["publishing", "complete"]
    identity: RunIdentity
    files: Mapping[str, PublishedFile]  # repo path -> file, every published file (card and manifest included)
    summary: RunSummary = field(default_factory=RunSummary)
    hub: HubTarget | None = None  # when the run has a Hub target

    @property
    def run_key(self) -> str:
        return self.identity.key

    def describe(self) -> str:
        """One phrase naming the run for messages: key, model, size, date."""
        model = self.summary.model or "unknown model"
        created = self.summary.created or "unknown date"
        configs = sum(1 for name in self.files if name not in (CARD_FILE, MANIFEST_FILE))
        return f"run {self.run_key} ({model}, {configs} configs, created {created})"

    @property
    def pushed(self) -> bool:
        """Whether the files were pushed to the Hub target they were captured for."""
        return self.hub is not None and self.hub.pushed

    def to_json(self) -> str:
        """The record as ``run.json`` holds it."""
        data = {
            "format": _RECORD_FORMAT,
            "state": self.state,
            "run_key": self.identity.key,
            "identity": dict(self.identity.document),
            "files": files_to_json(self.files),
            "summary": self.summary.to_json(),
            "hub": None if self.hub is None else self.hub.to_json(),
        }
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path | str) -> Record:
        """Parse ``run.json`` read from ``where``; an unreadable one is a :class:`QkcoreError` naming it."""
        try:
            data = json.loads(text)
            if data.get("format") != _RECORD_FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            if data["state"] not in ("publishing", "complete"):
                raise ValueError(f"unknown state {data['state']!r}")
            return cls(
                state=data["state"],
                identity=RunIdentity(str(data["run_key"]), dict(data.get("identity") or {})),
                files=files_from_json(data["files"]),
                summary=RunSummary.from_json(data.get("summary")),
                hub=HubTarget.from_json(data.get("hub")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QkcoreError(
                f"{where} is unreadable ({exc}); qkcore cannot tell which run this data root holds: "
                "move the data root aside, or rerun with --restart --replace to rebuild it"
            ) from None


def file_entry(path: Path) -> PublishedFile:
    """The :class:`~qkcore.run_state.PublishedFile` of a local file (reads it to hash it)."""
    stat = path.stat()
    return PublishedFile(size=stat.st_size, sha256=sha256_file(path), mtime_ns=stat.st_mtime_ns)
