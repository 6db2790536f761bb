"""The local data root's lock held on behalf of another process (``locked(held=TOKEN)``, the sweep's tasks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkcore.errors import QkcoreError
from qkcore.output import LocalDataRoot


def _root(tmp_path: Path) -> LocalDataRoot:
    root = LocalDataRoot(tmp_path / "root")
    root.check_usable()
    return root


def test_a_task_runs_under_the_token_of_the_holder(tmp_path: Path) -> None:
    root = _root(tmp_path)
    with root.locked("qkcore sweep a.yaml") as token:
        with root.locked("task", held=token) as seen:
            assert seen == token


def test_another_token_is_refused_naming_the_holder(tmp_path: Path) -> None:
    root = _root(tmp_path)
    with root.locked("qkcore sweep a.yaml"):
        with pytest.raises(QkcoreError, match=r"in use by process \d+ .*qkcore sweep a\.yaml.*not by the sweep"):
            with root.locked("task", held="0" * 32):
                pass


def test_a_lock_nobody_holds_any_more_is_refused_and_left_free(tmp_path: Path) -> None:
    root = _root(tmp_path)
    with root.locked("qkcore sweep a.yaml") as token:
        pass
    with pytest.raises(QkcoreError, match="no longer held by the sweep"):
        with root.locked("task", held=token):
            pass
    with root.locked("qkcore sniff"):  # the check released what it took
        pass


def test_a_second_holder_still_fails_at_once(tmp_path: Path) -> None:
    root = _root(tmp_path)
    with root.locked("first"):
        with pytest.raises(QkcoreError, match="in use by"):
            with root.locked("second"):
                pass
