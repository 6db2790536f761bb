"""The facts of one run, typed once: **where the run's state is defined**.

Every place that writes or reads a run's facts uses these frozen dataclasses and their
JSON round trip: the staging journal's ``state`` (:class:`RunState`), the data root's
record (:class:`~qkcore.output.record.Record`), the manifest
(:class:`~qkcore.manifest.Manifest`), the card's model entry
(:class:`~qkcore.card.ModelEntry`) and what ``qkcore sniff`` returns
(:class:`SniffResult`).

==================  ==================================================================
type                what
==================  ==================================================================
:data:`Phase`       ``capturing`` -> ``captured`` -> ``finalized`` (journal)
:class:`RunIdentity` the run's identity document and the key that names it
:class:`PublishedFile` one published file: size, sha256 (and mtime for the quick check)
:class:`HubTarget`  the Hub repo and branch a run publishes to, and the pushed commit
:class:`RunSummary` model, date and counts of a finished run
:class:`RunState`   a capture's progress, committed with its staged rows
:class:`SniffResult` what a ``qkcore sniff`` did and what the root now publishes
==================  ==================================================================

The JSON each type writes is what the release before these types wrote (``run.json``
format 1, ``journal.json`` format 1, ``qkcore.json`` format 1), so roots and staging
written by it still read (``tests/fixtures/state_v1``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

Phase = Literal["capturing", "captured", "finalized"]
#: ``shards to capture``: the prepare step of a ``qkcore sweep --shards K`` run found capture work for its shards.
Action = Literal["captured", "already complete", "pulled", "published", "shards to capture"]

#: Identity documents are JSON objects: settings and fingerprints (see :mod:`qkcore.identity`).
IdentityDocument = Mapping[str, Any]


def _int(data: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return value


def _str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def _required_str(data: Mapping[str, Any], key: str, what: str) -> str:
    value = _str(data, key)
    if not value:
        raise ValueError(f"{what} has no {key}")
    return value


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class RunIdentity:
    """The settings and fingerprints that decide a run's rows (:func:`qkcore.identity.run_identity`), and its key.

    ``document`` is compared as a whole and hashed into ``key``; nothing reads single
    facts out of it except :meth:`weights`, for the card.
    """

    key: str
    document: IdentityDocument = field(default_factory=dict)

    @classmethod
    def of(cls, document: IdentityDocument) -> RunIdentity:
        """The identity ``document`` with the key computed from it (16 hex digits of its sha256)."""
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
        return cls(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], document)

    @property
    def weights(self) -> dict[str, Any]:
        """Where the weights came from (the identity's ``model.weights``), for the card."""
        model = self.document.get("model") if isinstance(self.document, Mapping) else None
        weights = model.get("weights") if isinstance(model, Mapping) else None
        return dict(weights) if isinstance(weights, Mapping) else {}


@dataclass(frozen=True)
class PublishedFile:
    """One published file: size (``None`` where not recorded), sha256, and mtime (the quick check; 0: unknown)."""

    size: int | None
    sha256: str
    mtime_ns: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "mtime_ns": self.mtime_ns}

    @classmethod
    def from_json(cls, data: Any) -> PublishedFile:
        data = _mapping(data, "a file entry")
        sha = _required_str(data, "sha256", "a file entry")
        size = data.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int)):
            raise ValueError(f"size must be an integer, got {size!r}")
        return cls(size, sha, _int(data, "mtime_ns"))

    def matches(self, other: PublishedFile) -> bool:
        """Same content: the sha256, and the size where both record one."""
        return self.sha256 == other.sha256 and (self.size is None or other.size is None or self.size == other.size)


def files_to_json(files: Mapping[str, PublishedFile]) -> dict[str, dict[str, Any]]:
    """``{repo path: entry}`` as JSON, sorted by path."""
    return {name: files[name].to_json() for name in sorted(files)}


def files_from_json(data: Any) -> dict[str, PublishedFile]:
    return {str(name): PublishedFile.from_json(entry) for name, entry in _mapping(data, "files").items()}


@dataclass(frozen=True)
class HubTarget:
    """The Hub dataset repo and branch a run publishes to, and the commit it was pushed as (``None``: not yet)."""

    repo: str
    branch: str
    pushed_commit: str | None = None

    @property
    def where(self) -> str:
        return f"{self.repo}@{self.branch}"

    @property
    def pushed(self) -> bool:
        return bool(self.pushed_commit)

    def is_pushed_to(self, repo: str, branch: str) -> bool:
        """Whether this run was pushed to exactly ``repo@branch``."""
        return self.pushed and (self.repo, self.branch) == (repo, branch)

    def to_json(self) -> dict[str, Any]:
        return {"repo": self.repo, "branch": self.branch, "pushed_commit": self.pushed_commit}

    @classmethod
    def from_json(cls, data: Any) -> HubTarget | None:
        if data is None:
            return None
        data = _mapping(data, "hub")
        return cls(_required_str(data, "repo", "hub"), _required_str(data, "branch", "hub"), _str(data, "pushed_commit"))


@dataclass(frozen=True)
class RunSummary:
    """What a finished run was, in a line: its model, when, and its counts."""

    model: str | None = None
    created: str | None = None  # ISO timestamp
    documents: int = 0
    tokens: int = 0
    skipped: int = 0  # documents without tokens
    nonfinite_rows: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "created": self.created, "documents": self.documents, "tokens": self.tokens,
                "skipped": self.skipped, "nonfinite_rows": self.nonfinite_rows}

    @classmethod
    def from_json(cls, data: Any) -> RunSummary:
        data = _mapping(data or {}, "summary")
        return cls(_str(data, "model"), _str(data, "created"), _int(data, "documents"), _int(data, "tokens"),
                   _int(data, "skipped"), _int(data, "nonfinite_rows"))


@dataclass(frozen=True)
class RunState:
    """A capture's progress: the staging journal's ``state``, committed with the staged rows.

    ``phase`` moves ``capturing`` -> ``captured`` (every document done; under torchrun,
    the ranks merged) -> ``finalized`` (final files, card and manifest waiting in
    ``.qkcore/final``, listed in ``files``, summarised in ``summary``).
    """

    identity: RunIdentity
    world_size: int = 1
    replace: bool = False  # approved with --replace: publishing removes another run's files
    phase: Phase = "capturing"
    next_index: int = 0  # the dataset index the capture continues from
    documents: int = 0
    skipped: int = 0  # documents without tokens (empty texts)
    tokens: int = 0
    example_ids: tuple[int, ...] = ()
    files: Mapping[str, PublishedFile] = field(default_factory=dict)  # repo path -> file (finalized)
    summary: RunSummary | None = None  # finalized

    @property
    def run_key(self) -> str:
        return self.identity.key

    def to_json(self) -> dict[str, Any]:
        """The JSON object the journal keeps (the layout of journal format 1)."""
        return {
            "run_key": self.identity.key,
            "identity": dict(self.identity.document),
            "world_size": self.world_size,
            "replace": self.replace,
            "phase": self.phase,
            "next_index": self.next_index,
            "documents": self.documents,
            "skipped": self.skipped,
            "tokens": self.tokens,
            "example_ids": list(self.example_ids),
            "files": files_to_json(self.files),
            "summary": {} if self.summary is None else self.summary.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any) -> RunState:
        """Parse a journal's ``state``; ``ValueError`` names what is wrong."""
        data = _mapping(data, "the journal's state")
        key = _required_str(data, "run_key", "the journal's state")
        phase = data.get("phase", "capturing")
        if phase not in get_args(Phase):
            raise ValueError(f"unknown phase {phase!r}")
        ids = data.get("example_ids") or []
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError("example_ids must be a list of integers")
        summary = data.get("summary")
        return cls(
            identity=RunIdentity(key, dict(_mapping(data.get("identity") or {}, "identity"))),
            world_size=_int(data, "world_size", 1),
            replace=bool(data.get("replace", False)),
            phase=phase,
            next_index=_int(data, "next_index"),
            documents=_int(data, "documents"),
            skipped=_int(data, "skipped"),
            tokens=_int(data, "tokens"),
            example_ids=tuple(ids),
            files=files_from_json(data.get("files") or {}),
            summary=RunSummary.from_json(summary) if summary else None,
        )


@dataclass(frozen=True)
class SniffResult:
    """What a ``qkcore sniff`` did and what the data root now publishes (on torchrun ranks > 0: their share)."""

    data_root: Path | str  # a local folder, or the URL of a data root on object storage
    rows: Mapping[str, int]  # config -> rows published
    summary: RunSummary
    action: Action = "captured"
    #: Seconds from the start of the run to the end of named steps (``loaded``: the model loaded and planned).
    seconds: Mapping[str, float] = field(default_factory=dict)

    @property
    def documents(self) -> int:
        return self.summary.documents

    @property
    def tokens(self) -> int:
        return self.summary.tokens
