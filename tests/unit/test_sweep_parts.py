"""The parts of ``qkcore sweep`` that need no Ray: shards as ranks, the rule for staged shards, the table, the paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkcore.distributed import Ranks
from qkcore.errors import QkcoreError
from qkcore.root_policy import RootView, decide
from qkcore.run_state import RunIdentity
from qkcore.sweep.progress import Board, Event, line
from qkcore.sweep.runs import Run, expand, load_runs
from qkcore.sweep.summary import RunReport, exit_code, table


@pytest.mark.parametrize("batch_size", [1, 3])
def test_shard_i_of_k_owns_exactly_the_batches_of_torchrun_rank_i_without_a_process_group(batch_size: int) -> None:
    for k in (1, 2, 3):
        for i in range(k):
            shard, rank = Ranks.shard(i, k), Ranks(rank=i, world_size=k)
            assert not shard.distributed  # no collective ever waits for another shard
            assert [d for d in range(40) if shard.owns(d, batch_size)] == [d for d in range(40) if rank.owns(d, batch_size)]
    owners = [[i for i in range(3) if Ranks.shard(i, 3).owns(d, 2)] for d in range(12)]
    assert owners == [[(d // 2) % 3] for d in range(12)]  # batch b -> shard b % K, each document once
    with pytest.raises(ValueError):
        Ranks.shard(3, 3)


IDENTITY = RunIdentity.of({"run": 1})


def test_a_sweep_killed_before_every_shard_committed_resumes_with_the_same_k_and_refuses_another_k() -> None:
    # Shard 0 committed, shards 1 and 2 never started: only one staging exists, of a 3-shard run.
    view = RootView("/root", None, (), None, ranks=(0,), ranks_run_key=IDENTITY.key, ranks_world_size=3)
    assert decide(view, IDENTITY, world_size=3).action == "resume"
    with pytest.raises(QkcoreError, match="3-process torchrun run \\(or 3-shard sweep\\).*--shards 3.*--restart"):
        decide(view, IDENTITY, world_size=2)
    other = RunIdentity.of({"run": 2})
    with pytest.raises(QkcoreError, match="of another config"):
        decide(view, other, world_size=3)
    assert decide(view, IDENTITY, world_size=2, restart=True).discard_staged


def _report(name: str, status: str, rows: int = 0) -> RunReport:
    return RunReport(Run(name, None, None if status == "done" else "x"), status, "captured", rows, 1.5, "why")  # type: ignore[arg-type]


def test_the_exit_code_is_0_only_when_every_run_is_complete_and_2_when_the_user_must_fix_one() -> None:
    assert exit_code([_report("a", "done"), _report("b", "done")]) == 0
    assert exit_code([_report("a", "done"), _report("b", "error")]) == 1
    assert exit_code([_report("a", "failed"), _report("b", "error")]) == 2
    text = table([_report("a.yaml", "done", 1234), _report("bad.yaml", "failed")])
    assert "1,234" in text and "1 of 2 runs complete" in text and "bad.yaml: failed: why" in text


def test_a_folder_is_every_yaml_below_it_and_a_config_that_does_not_load_is_named(tmp_path: Path) -> None:
    (tmp_path / "x" / "y").mkdir(parents=True)
    for name in ("x/b.yaml", "x/y/a.yaml", "x/notes.txt"):
        (tmp_path / name).write_text("model: {}\n", encoding="utf-8")
    found = expand([str(tmp_path / "x"), str(tmp_path / "x" / "b.yaml")])
    assert found == [tmp_path / "x" / "b.yaml", tmp_path / "x" / "y" / "a.yaml"]
    runs = load_runs([str(tmp_path / "missing.yaml"), str(tmp_path / "x" / "b.yaml")])
    assert runs[0].error == f"{tmp_path / 'missing.yaml'}: no such config file"
    assert runs[1].cfg is None and runs[1].error and "b.yaml" in runs[1].error


def test_the_board_keeps_the_latest_process_of_each_shard_and_a_line_shows_it() -> None:
    board = Board()
    board.report(Event("r.yaml", 1, "capturing", 3, 10, pid=11))
    board.report(Event("r.yaml", 1, "capturing", 4, 10, pid=12))
    assert board.pids() == {("r.yaml", 1): 12} and len(board.drain()) == 2 and board.drain() == []
    assert line(Event("r.yaml", 1, "capturing", 4, 10, pid=12)) == "  r.yaml [shard 1]: capturing 4/10 documents (pid 12)"
    assert line(Event("r.yaml", None, "failed", detail="bad")) == "  r.yaml: failed: bad"
