"""``journal.json``: the last commit of a staging folder, and what a resume may take from it.

The journal lists the committed part files, the next part number, every config's
head_dim and sliding window, the caller's ``state`` and the ``run_key`` of the run that
wrote it. It is rewritten durably (:mod:`qkcore.fsutil`) at each commit, so a crash
leaves the previous commit or the new one. Parts written after the last commit are not
listed: a resume deletes them (:func:`resume`) and the caller re-adds those rows.

**Damaged parts.** A part is fsynced before the commit that lists it, but a disk (or a
machine) can still lose or change its bytes. The journal records each part's size and
sha256 (``part_sums``) and keeps the :data:`EARLIER_COMMITS` commits before the last one
(``earlier``: their parts, next part, configs and state; parts only ever grow, so an
earlier commit lists a prefix of the parts; the journal grows up to four times, as each
kept state holds its example ids). A resume checks every listed part; when one
is damaged it resumes from the newest commit that does not list it (the caller captures
what came after again, as after a crash), or, when no kept commit is intact, raises
:class:`StagingConflict` (the run layer names ``--restart``). A journal written before
these fields existed resumes as before; its parts are checked only for opening as
indexed Arrow files (a part cut short is found, a byte changed inside is not), and a
damaged one has no earlier commit to return to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from qkcore.errors import QkcoreError
from qkcore.fsutil import remove_tree, write_text_durably
from qkcore.staging.parts import PartSum, part_damage

log = structlog.get_logger(__name__)

JOURNAL_FILE = "journal.json"
_FORMAT = 1
#: How many commits before the last one a journal keeps, to resume from when a part is damaged.
EARLIER_COMMITS = 3

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
    """One commit: the parts it holds, the configs it saw and the caller's state; the commits before it."""

    run_key: str | None
    parts: list[str]
    next_part: int
    configs: dict[str, ConfigMeta]
    state: Any
    sums: dict[str, PartSum] = field(default_factory=dict)  # part -> size and sha256 as written
    earlier: list[dict[str, Any]] = field(default_factory=list)  # earlier commits' bodies, newest first

    def body(self) -> dict[str, Any]:
        """This commit as an entry of a later journal's ``earlier``: parts, next part, configs, state."""
        return {
            "parts": self.parts,
            "next_part": self.next_part,
            "configs": {
                name: {"head_dim": head_dim, "sliding_window": sliding_window}
                for name, (head_dim, sliding_window) in sorted(self.configs.items())
            },
            "state": self.state,
        }

    def write(self, staging_dir: Path) -> None:
        """Write this commit as ``staging_dir/journal.json``, durably."""
        journal = {
            "format": _FORMAT,
            "run_key": self.run_key,
            **self.body(),
            "part_sums": {
                name: {"size": self.sums[name].size, "sha256": self.sums[name].sha256}
                for name in self.parts if name in self.sums
            },
            "earlier": self.earlier[:EARLIER_COMMITS],
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

    Reads only: a staging folder without a journal (nothing committed) is left for the
    caller to remove once the rule decided. An unreadable journal raises
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
    return journal


def resume(staging_dir: Path, run_key: str | None) -> Journal:
    """The commit in ``staging_dir`` that the run ``run_key`` resumes; everything it does not list is deleted.

    That is the last commit, or, when one of its parts is damaged, the newest earlier
    commit whose parts are intact (rewritten as the journal before anything is deleted,
    and said in one warning). Raises :class:`StagingConflict` if the journal is
    unreadable, was written by another run (or ``run_key`` is ``None``), or lists a
    damaged part that no kept earlier commit goes without.
    """
    journal = read_journal(staging_dir)
    assert journal is not None  # called only when the journal file exists
    staged_key, staged_state = journal.get("run_key"), journal.get("state")
    try:
        ok = journal.get("format") == _FORMAT
        last = _commit(staged_key, journal)
        sums = {name: PartSum(int(v["size"]), str(v["sha256"])) for name, v in (journal.get("part_sums") or {}).items()}
        earlier = list(journal.get("earlier") or [])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StagingConflict(f"{staging_dir} holds an unreadable journal (no {exc})") from exc
    if not ok or run_key is None or staged_key != run_key:
        raise StagingConflict(
            f"{staging_dir} holds an unfinished run whose configuration differs from this "
            f"one (run_key {staged_key!r}, this run {run_key!r})",
            staged_key,
            staged_state,
        )
    damaged = {part: why for part in last.parts if (why := part_damage(staging_dir / part, sums.get(part)))}
    commit = last
    if damaged:
        first = next(part for part in last.parts if part in damaged)
        what = f"{staging_dir / first} is damaged ({damaged[first]})"
        commit = _last_intact(staged_key, earlier, set(damaged), what, staged_state)
        commit.sums = {name: sums[name] for name in commit.parts if name in sums}
        commit.write(staging_dir)  # first: the journal never lists a part that is gone
        log.warning(
            f"{what}; resuming from the last commit whose parts are intact: what was captured after it is captured again",
            commits_back=len(earlier) - len(commit.earlier),
        )
    else:
        commit.sums, commit.earlier = sums, earlier
    keep = {JOURNAL_FILE, *commit.parts}
    for entry in staging_dir.iterdir():  # parts written after the commit, temp files
        if entry.name not in keep:
            remove_tree(entry) if entry.is_dir() else entry.unlink()
    return commit


def _commit(run_key: str | None, body: dict[str, Any]) -> Journal:
    """A commit read from a journal (or one of its ``earlier`` entries); KeyError/TypeError/ValueError if malformed."""
    return Journal(
        run_key=run_key,
        parts=[str(p) for p in body["parts"]],
        next_part=int(body["next_part"]),
        configs={name: (int(meta["head_dim"]), meta["sliding_window"]) for name, meta in dict(body["configs"]).items()},
        state=body["state"],
    )


def _last_intact(run_key: str | None, earlier: list[dict[str, Any]], damaged: set[str], what: str, state: Any) -> Journal:
    """The newest earlier commit listing none of the ``damaged`` parts (its own ``earlier``: the ones before it)."""
    for index, body in enumerate(earlier):
        try:
            commit = _commit(run_key, body)
        except (KeyError, TypeError, ValueError, AttributeError):
            break  # an unreadable entry: the ones before it cannot be trusted either
        if not damaged & set(commit.parts):
            commit.earlier = earlier[index + 1 :]
            return commit
    kept = f"none of the {len(earlier)} earlier commits kept goes without it" if earlier else "no earlier commit is kept"
    raise StagingConflict(f"{what}, and {kept}", run_key, state)


def committed_parts(staging_dir: Path) -> tuple[dict[str, ConfigMeta], list[str], dict[str, PartSum]]:
    """The configs, part files and part sums committed in another writer's staging (a torchrun rank's), for adoption."""
    journal = json.loads((staging_dir / JOURNAL_FILE).read_text(encoding="utf-8"))
    configs = {name: (int(meta["head_dim"]), meta["sliding_window"]) for name, meta in journal["configs"].items()}
    sums = {name: PartSum(int(v["size"]), str(v["sha256"])) for name, v in (journal.get("part_sums") or {}).items()}
    return configs, list(journal["parts"]), sums
