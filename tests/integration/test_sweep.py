"""``qkcore sweep`` (issue 20 §1, §2) with real parts: a local Ray of 2 CPUs, tiny random models, local data roots.

One Ray for the whole module (it takes seconds to start); the sweeps run in this process
and join it. Tests that need no Ray (the dry run, Ray missing) are in the fast tier.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from qkcore.config import load_config
from qkcore.output.local import LocalDataRoot
from qkcore.sniff import run_sniff
from tests.sweep_runs import published, sweep_cli, sweep_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """A local Ray with 2 CPUs, started in this process for the module and stopped after it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_sweep_names_the_bad_config_completes_the_others_and_a_second_sweep_does_nothing(ray_cluster, tmp_path) -> None:
    good = [sweep_config(tmp_path / name, documents=4) for name in ("a", "b")]
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: test/tiny}\nbogus_key: 1\n", encoding="utf-8")
    code, out = sweep_cli(*map(str, good), str(bad))
    assert code == 2, out
    assert re.search(rf"{re.escape(str(bad))}: failed: .*bogus_key", out), out
    assert out.count("captured") >= 2 and "2 of 3 runs complete" in out, out
    before = {path: published(path.parent / "out") for path in good}
    assert all(files["README.md"] for files in before.values())

    code, out = sweep_cli(*map(str, good))  # the bad config fixed by leaving it out: nothing left to do
    assert code == 0, out
    assert out.count("already complete") >= 2 and "2 of 2 runs complete" in out, out
    assert {path: published(path.parent / "out") for path in good} == before


@pytest.mark.slow
def test_three_shards_publish_byte_identical_files_to_one_process(ray_cluster, tmp_path) -> None:
    sections = dict(inference={"batch_size": 3}, capture={"sampler": {"type": "uniform", "base_rate": 4}})
    single = run_sniff(load_config(sweep_config(tmp_path / "single", documents=11, **sections)))
    sharded = sweep_config(tmp_path / "sharded", documents=11, **sections)
    code, out = sweep_cli("--shards", "3", str(sharded))
    assert code == 0, out
    for shard in range(3):
        assert f"[shard {shard}]: done" in out, out
    assert published(tmp_path / "sharded" / "out") == published(tmp_path / "single" / "out")
    assert single.rows and not LocalDataRoot(tmp_path / "sharded" / "out").ranks_dir.exists()


@pytest.mark.slow
def test_staged_shards_of_another_k_are_refused_unless_restart(ray_cluster, tmp_path) -> None:
    from qkcore.sniff import run_shard

    sections = dict(inference={"batch_size": 1})
    run_sniff(load_config(sweep_config(tmp_path / "single", documents=6, **sections)))
    config = sweep_config(tmp_path / "sharded", documents=6, **sections)
    root = LocalDataRoot(tmp_path / "sharded" / "out")
    root.check_usable()
    with root.locked("qkcore sweep --shards 3") as token:  # a 3-shard sweep that ended after shard 1 committed
        run_shard(load_config(config), 1, 3, held=token)
    assert root.staged_ranks() == [1]
    code, out = sweep_cli("--shards", "2", str(config))
    assert code == 2, out
    assert re.search(r"failed: .*3-shard sweep.*--shards 3.*--restart", out), out
    assert root.staged_ranks() == [1] and not (root.path / "README.md").exists()  # nothing changed
    code, out = sweep_cli("--shards", "2", "--restart", str(config))
    assert code == 0, out
    assert published(root.path) == published(tmp_path / "single" / "out")


@pytest.mark.slow
def test_a_killed_shard_worker_is_retried_from_its_last_commit_and_the_result_is_byte_identical(ray_cluster, tmp_path) -> None:
    from qkcore.sweep.driver import SweepOptions, run_sweep

    sections = dict(inference={"batch_size": 1})
    run_sniff(load_config(sweep_config(tmp_path / "single", documents=90, **sections)))
    config = sweep_config(tmp_path / "sharded", documents=90, **sections)
    lines: list[str] = []
    killed: dict[str, int] = {}
    progress = re.compile(r"\[shard 1\]: capturing (\d+)/(\d+) documents \(pid (\d+)\)")

    def echo(text: str) -> None:  # the driver's console: kill shard 1's worker half-way through
        lines.append(text)
        match = progress.search(text)
        # The first line after shard 1's first commit (a shard takes seconds here; the driver polls every 0.5 s).
        if match and not killed and 1 <= int(match[1]) < int(match[2]):
            killed["pid"], killed["at"] = int(match[3]), int(match[1])
            os.kill(killed["pid"], signal.SIGKILL)

    reports = run_sweep([str(config)], SweepOptions(shards=3, max_retries=2), echo=echo)
    assert killed, "\n".join(lines)
    assert [r.status for r in reports] == ["done"], reports
    after = [int(m[3]) for m in map(progress.search, lines[lines.index(next(
        t for t in lines if f"(pid {killed['pid']})" in t and "[shard 1]" in t)):]) if m]
    assert any(pid != killed["pid"] for pid in after), "\n".join(lines)  # another worker ran the shard again
    resumed = [int(m[1]) for m in map(progress.search, lines) if m and int(m[3]) != killed["pid"]]
    assert resumed and min(resumed) > 1, "\n".join(lines)  # from its last commit, not from the first document
    assert published(tmp_path / "sharded" / "out") == published(tmp_path / "single" / "out")


@pytest.mark.slow
def test_a_tensor_parallel_run_is_a_torchrun_group_inside_its_task_under_the_sweeps_lock(ray_cluster, tmp_path) -> None:
    """tensor_parallel_size 2 (CPU: the task asks for no GPU): its torchrun ranks run under the sweep's lock token."""
    from qkcore.testing import tiny_architecture
    from tests.integration.test_tensor_parallel_torchrun import FP32_TOLERANCE, _checkpoint, assert_rows_match_one_process
    from tests.integration.test_tensor_parallel_torchrun import _config as tp_config

    checkpoint, _ = _checkpoint(tmp_path / "llama", tiny_architecture("llama"), {})
    tp = tp_config(tmp_path / "tp", checkpoint, {}, inference={"tensor_parallel_size": 2})
    one = run_sniff(load_config(tp_config(tmp_path / "one", checkpoint, {}))).data_root
    code, out = sweep_cli(str(tp))
    assert code == 0, out
    assert "captured under torchrun" in out, out
    assert_rows_match_one_process(tmp_path / "tp" / "out", Path(one), FP32_TOLERANCE)


@pytest.mark.slow
def test_a_sweep_is_refused_a_root_another_sweep_holds_naming_the_holder(ray_cluster, tmp_path) -> None:
    config = sweep_config(tmp_path / "a", documents=2)
    root = LocalDataRoot(tmp_path / "a" / "out")
    root.check_usable()
    with root.locked("qkcore sweep other.yaml"):
        code, out = sweep_cli(str(config))
    assert code == 2, out
    assert re.search(r"run\.yaml: failed: .*in use by process \d+ .*qkcore sweep other\.yaml", out), out
    assert not (tmp_path / "a" / "out" / "README.md").exists()


def test_a_task_runs_only_under_the_lock_of_its_sweep(tmp_path) -> None:
    """A task handed a token is refused when the root is not held under it (the sweep ended), naming what to do."""
    from qkcore.errors import QkcoreError

    cfg = load_config(sweep_config(tmp_path / "a", documents=2))
    with pytest.raises(QkcoreError, match="no longer held by the sweep"):
        run_sniff(cfg, held="0" * 32)
    root = LocalDataRoot(cfg.output.data_root)
    with root.locked("qkcore sweep other.yaml"), pytest.raises(QkcoreError, match="in use by .*qkcore sweep other"):
        run_sniff(cfg, held="0" * 32)
    assert not (root.path / "README.md").exists()


def test_dry_run_prints_every_plan_and_runs_nothing(tmp_path) -> None:
    configs = [sweep_config(tmp_path / name, documents=3) for name in ("a", "b")]
    code, out = sweep_cli("--dry-run", "--shards", "2", str(tmp_path))  # a folder: every *.yaml below it
    assert code == 0, out
    for config in configs:
        assert f"== {config}" in out
    assert out.count("qkcore plan:") == 2 and "2 shard tasks" in out and "0 GPU(s)" in out, out
    assert not any((tmp_path / name / "out").exists() for name in ("a", "b"))


def test_without_ray_the_sweep_is_one_line_naming_the_pip_command(tmp_path) -> None:
    config = sweep_config(tmp_path / "a", documents=2)
    script = "import sys; sys.modules['ray'] = None; from qkcore.cli import main; raise SystemExit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", script, "sweep", str(config)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'qkcore[ray]'" in lines[0], done.stderr
    assert not (tmp_path / "a" / "out").exists()
