"""What a run may do with the data root (and Hub branch) it is pointed at: the rule, in one place.

:func:`decide` looks at what the root holds (its record, its published files, staged
work) and what the branch holds, compares it with the run's identity, and returns an
action or refuses with one message naming both runs and the way out:

====================================================  =========================================
the root holds                                        the run with identity K
====================================================  =========================================
nothing (and the branch nothing, or run K)            captures (or pulls K from the branch)
run K, complete, files unchanged                      does nothing ("already complete")
run K, staged or finished but not yet published       resumes / finishes publishing
another run, or files no run recorded (or a record   is refused; ``--replace`` lets K replace
that cannot be read)                                  them when K publishes
run K, complete, files missing or changed             is refused, naming them; ``--replace``
                                                      captures K again
another run's staged work                             is refused; ``--restart`` discards it
a torchrun run's staged work, other world size        is refused; ``--restart`` discards it
====================================================  =========================================

A branch that holds another run (or files qkcore did not write) is refused the same
way, since a push makes the branch hold exactly this root's run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from qkcore.errors import QkcoreError
from qkcore.identity import describe_difference
from qkcore.output.record import Record
from qkcore.run_state import RunIdentity, RunState

Action = Literal["complete", "publish", "resume", "fresh", "pull"]


@dataclass(frozen=True)
class RootView:
    """What a data root holds, read once under its lock."""

    path: str
    record: Record | None
    dataset_files: tuple[str, ...]  # published files on disk
    staged: RunState | None  # the staging journal's committed state, if any
    ranks: tuple[int, ...] = ()  # torchrun ranks with staged work
    ranks_run_key: str | None = None  # run key staged by rank 0, if readable
    #: the world size (torchrun ranks or sweep shards) the first staged rank committed with, if readable;
    #: a rank that never committed has no staging, so the count of ranks alone can be short
    ranks_world_size: int | None = None
    problems: tuple[str, ...] = ()  # the published files against the record (see LocalDataRoot.verify)
    unreadable_record: str | None = None  # run.json is there but unreadable: what is wrong with it


@dataclass(frozen=True)
class BranchView:
    """What the Hub branch holds (from the preflight, before any model is loaded)."""

    where: str  # "repo@branch"
    files: tuple[str, ...]  # dataset files on the branch (".gitattributes" left out)
    run_key: str | None  # the qkcore run its card records, if any
    commit: str | None


@dataclass(frozen=True)
class Decision:
    """What the run does: its action, whether it may replace another run, and what to discard first."""

    action: Action
    replace: bool = False  # publishing may remove another run's files (root and branch)
    discard_staged: bool = False  # remove staging/final/ranks before starting
    notes: tuple[str, ...] = field(default_factory=tuple)


def decide(
    root: RootView,
    identity: RunIdentity,
    *,
    restart: bool = False,
    replace: bool = False,
    world_size: int = 1,
    branch: BranchView | None = None,
) -> Decision:
    """Decide what the run with ``identity`` does with ``root`` and ``branch``.

    Decides only: discarding what the decision says to discard is the caller's step.
    Raises :class:`~qkcore.errors.QkcoreError` with one line when the run must not touch them.
    """
    run_key = identity.key
    notes: list[str] = []
    staged_ok = _check_staged(root, identity, restart=restart, world_size=world_size)
    if staged_ok is not None:
        action, approved = staged_ok
        check_branch(branch, run_key, replace or approved)
        return Decision(action, replace=replace or approved)
    discard = restart and (root.staged is not None or bool(root.ranks))
    if root.unreadable_record is not None and not replace:
        raise QkcoreError(
            f"{root.unreadable_record}; qkcore cannot tell which run {root.path} holds: use another "
            "output.data_root, or add --replace to discard its files when this run finishes"
        )
    record = root.record
    if record is not None and record.state == "publishing":
        same = record.run_key == run_key
        if same and not restart:
            return Decision("publish", replace=True)
        if not same and not replace:
            raise QkcoreError(
                f"{root.path} is half-way through publishing {record.describe()}: rerun that run's config to "
                "finish it, or add --replace to discard it and capture this run"
            )
        check_branch(branch, run_key, True)
        return Decision("fresh", replace=True, discard_staged=True)
    if record is not None and record.run_key == run_key:
        if root.problems and not replace:
            raise QkcoreError(changed_files_message(root.path, record, root.problems, "nothing was captured"))
        if not root.problems and not restart:
            check_branch(branch, run_key, replace)
            return Decision("complete", replace=replace)
        check_branch(branch, run_key, replace)
        return Decision("fresh", replace=True, discard_staged=discard, notes=tuple(notes))
    if record is not None and not replace:
        pushed = "" if record.hub is None or record.hub.pushed else f"; it was never pushed to {record.hub.where}"
        raise QkcoreError(
            f"{root.path} holds {record.describe()}{pushed}; this config is a different run "
            f"({describe_difference(record.identity.document, identity.document)}): use another output.data_root, "
            "or add --replace to discard that run's files when this one finishes"
        )
    if record is None and root.dataset_files and not replace:
        raise QkcoreError(
            f"{root.path} holds dataset files that no qkcore run recorded ({', '.join(root.dataset_files[:3])}"
            f"{', ...' if len(root.dataset_files) > 3 else ''}): use another output.data_root, "
            "or add --replace to discard them when this run finishes"
        )
    if branch is not None and branch.files and branch.run_key == run_key and record is None and not root.dataset_files:
        return Decision("pull", discard_staged=discard)
    check_branch(branch, run_key, replace)
    return Decision("fresh", replace=replace or record is not None, discard_staged=discard, notes=tuple(notes))


def changed_files_message(where: str, record: Record, problems: tuple[str, ...] | list[str], outcome: str) -> str:
    """The refusal of a complete root whose files are missing or changed: which files, and the way out."""
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
    return (
        f"{where} holds {record.describe()}, but its files do not match the record ({shown}): {outcome}; rerun "
        "`qkcore sniff` with --replace to capture this run again (its files are replaced when it finishes)"
    )


def _check_staged(
    root: RootView, identity: RunIdentity, *, restart: bool, world_size: int
) -> tuple[Action, bool] | None:
    """Resume/publish this run's staged work, or refuse another's; ``None`` when there is nothing to resume.

    Returns the action and whether the staged run was approved to replace another run.
    """
    if restart:
        return None
    if root.ranks:
        n = root.ranks_world_size or len(root.ranks)
        if world_size != n or root.ranks_run_key != identity.key or max(root.ranks) >= n:
            same = root.ranks_run_key == identity.key
            raise QkcoreError(
                f"{root.path} holds the staged progress of a {n}-process torchrun run (or {n}-shard sweep)"
                + ("" if same else f" of another config (run {root.ranks_run_key})")
                + (f": rerun it with `torchrun --nproc-per-node {n}` (or `qkcore sweep --shards {n}`) to resume"
                   if same else ": rerun that config to resume")
                + ", or add --restart to discard it"
            )
        return "resume", False
    staged = root.staged
    if staged is None:
        return None
    if staged.run_key != identity.key:
        raise QkcoreError(
            f"{root.path} holds the unfinished run {staged.run_key}, {staged.documents} documents captured; "
            f"this config is a different run ({describe_difference(staged.identity.document, identity.document)}): "
            "rerun that run's config to resume it, or add --restart to discard its progress"
        )
    if staged.world_size != world_size:
        raise QkcoreError(
            f"{root.path} holds this run's progress captured with {staged.world_size} process(es); "
            f"resume it with the same number, or add --restart to discard it"
        )
    action: Action = "publish" if staged.phase == "finalized" else "resume"
    return action, staged.replace


def check_branch(branch: BranchView | None, run_key: str, replace: bool) -> None:
    """Refuse to push over a branch that holds something other than run ``run_key``, unless ``replace``."""
    if branch is None or not branch.files or branch.run_key == run_key or replace:
        return
    what = f"run {branch.run_key}" if branch.run_key else f"files qkcore did not write ({', '.join(branch.files[:3])})"
    raise QkcoreError(
        f"the Hub branch {branch.where} holds {what}; a push makes it hold exactly this run: "
        "use another output.hf_branch, or add --replace to replace it"
    )
