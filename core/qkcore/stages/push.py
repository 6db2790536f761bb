"""Stage 6 of a run: push the published files to the Hub branch, and record the commit.

``qkcore sniff`` pushes after publishing (and pushes a complete run that never was);
``qkcore push`` retries a push that failed. Both call :func:`push`.
"""

from __future__ import annotations

from dataclasses import replace

from qkcore.hub import GITATTRIBUTES, BranchState, HubSync, main_branch_readme
from qkcore.layout import CARD_FILE
from qkcore.output import DataRoot, Record
from qkcore.card import card_run_key
from qkcore.root_policy import BranchView
from qkcore.run_state import HubTarget


def hub_target(hub: HubSync, commit: str | None = None) -> HubTarget:
    """The run's Hub target: ``hub``'s repo and branch, pushed as ``commit`` (``None``: not yet)."""
    return HubTarget(hub.repo_id, hub.branch, commit)


def push(root: DataRoot, record: Record, hub: HubSync, message: str) -> Record:
    """Push the published files as one commit; write and return the record noting it.

    A failed push raises and leaves the record unpushed, the files kept.
    """
    with root.local_copy() as folder:
        commit = hub.push(folder, sorted(record.files), message)
    record = replace(record, hub=hub_target(hub, commit))
    root.write_record(record)
    return record


def branch_view(hub: HubSync, state: BranchState) -> BranchView:
    """What the rule needs to know of a branch: its files (what a push would replace) and the run its card names.

    ``state`` is what the preflight saw. The Hub's ``.gitattributes``, and a
    ``README.md`` that is the main branch's (a branch is created from ``main``, so it
    starts with the README qkcore seeds there), are not content.
    """
    files = [f for f in state.files if f != GITATTRIBUTES]
    if state.card is not None and state.card == main_branch_readme(hub.repo_id):
        files = [f for f in files if f != CARD_FILE]
    return BranchView(hub.where, tuple(files), card_run_key(state.card), state.commit)
