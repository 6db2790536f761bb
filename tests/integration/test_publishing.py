"""Real data in, Hub dataset out: string ids, uneven lengths, batching, branch-per-model push.

The Hub is a local server speaking its HTTP API (``tests/hub_server.py``), so the whole
path real runs take (preflight → capture → publish → push in one commit, or a pull of the
same run) runs unchanged, down to huggingface_hub's requests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from qkcore.card import read_front_matter
from qkcore.cli import main
from qkcore.config import load_config
from qkcore.errors import QkcoreError
from qkcore.hub import GITATTRIBUTES
from qkcore.output import LocalDataRoot
from qkcore.sniff import run_sniff
from tests.conftest import write_corpus
from tests.hub_server import HubServer, hub_server  # noqa: F401 (fixture)

REPO = "lab/sniffed-qk"
BRANCH = "tiny-llama"

UNEVEN = [
    ("alpha", "Short."),
    ("beta-β", "A rather longer document about tide gauges, sluices, and what the curve of a flood looks like."),
    ("γ", "Medium length text about pendulum clocks and rating nuts."),
    ("delta", "x" * 300),
    ("epsilon", "Two sentences here. The second one is a little longer than the first."),
    ("zeta", "Another one, about looms: warp threads wound onto the back beam under even tension."),
    ("eta", "The end."),
]


def _branch_files(server: HubServer, branch: str = BRANCH) -> dict[str, bytes]:
    files = server.files(REPO, branch)
    files.pop(GITATTRIBUTES, None)  # the Hub's LFS settings, kept on every branch
    return files


def _local_files(root: Path) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in LocalDataRoot(root).dataset_files()}


def _pushed(root: Path) -> bool:
    record = LocalDataRoot(root).read_record()
    return record is not None and record.pushed


def _config(tiny_config, tmp_path: Path, root: str, batch_size: int, **output) -> Path:
    corpus = write_corpus(tmp_path / "uneven.jsonl", UNEVEN)
    return tiny_config(
        dataset={"path": str(corpus)},
        inference={"batch_size": batch_size},
        capture={"sampler": {"type": "uniform", "base_rate": 6}, "head_sampling": {"count": 6, "seed": 3}},
        output={"data_root": str(tmp_path / root), **output},
    )


def test_batched_run_equals_batch_one_and_pushes_one_commit(tiny_config, tmp_path, hub_server) -> None:
    batched = load_config(_config(tiny_config, tmp_path, "b3", 3, hf_repo_id=REPO, hf_branch=BRANCH))
    result = run_sniff(batched)
    single = run_sniff(load_config(_config(tiny_config, tmp_path, "b1", 1)))

    # Card lists every config, and load_dataset reads each; rows equal the batch-size-1 run.
    front, _ = read_front_matter(result.data_root / "README.md")
    names = [c["config_name"] for c in front["configs"]]
    assert sorted(names) == sorted(result.rows) == sorted(single.rows)
    for name in names:
        rows = load_dataset(str(result.data_root), name, cache_dir=str(tmp_path / "cache"))["train"]
        assert len(rows) == result.rows[name]
        _assert_same_rows(result.data_root / name / "data.parquet", single.data_root / name / "data.parquet")

    # The branch was checked (token, refs) before the one commit on the model's branch, with every file.
    requests = [path for _, path in hub_server.requests]
    assert requests.index("/api/whoami-v2") < requests.index(f"/api/datasets/{REPO}/refs")
    assert requests.index(f"/api/datasets/{REPO}/refs") < requests.index(f"/api/datasets/{REPO}/commit/{BRANCH}")
    history = hub_server.history(REPO, BRANCH)
    assert history[0].message.startswith("qkcore: test/tiny") and history[1].oid == hub_server.history(REPO, "main")[1].oid
    assert _branch_files(hub_server) == _local_files(result.data_root)
    assert set(_branch_files(hub_server)) == {"README.md", "qkcore.json", *(f"{n}/data.parquet" for n in names)}
    # The new repo's main explains the branches and lists this one.
    assert f"| `{BRANCH}` | test/tiny |" in hub_server.files(REPO, "main")["README.md"].decode()
    assert _pushed(result.data_root)


def _assert_same_rows(batched: Path, single: Path) -> None:
    """Same rows in the same order; vectors equal to float32 rounding.

    Differently padded batches run differently shaped kernels, so values past the
    first layer may differ in the last bit; which rows are kept never does.
    """
    a, b = pq.read_table(batched), pq.read_table(single)
    for column in ("bucket", "example_id", "position", "sliding_window"):
        assert a.column(column).equals(b.column(column)), f"{batched.parent.name}: {column} differs"
    va = np.array(a.column("vector").to_pylist(), dtype=np.float32)
    vb = np.array(b.column("vector").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-6, err_msg=batched.parent.name)


def test_a_branch_holding_another_run_is_refused_before_any_compute_then_replaced(tiny_config, tmp_path, hub_server) -> None:
    first = run_sniff(load_config(_config(tiny_config, tmp_path, "first", 2, hf_repo_id=REPO, hf_branch=BRANCH)))
    published = _branch_files(hub_server)
    cfg = load_config(_config(tiny_config, tmp_path, "second", 2, hf_repo_id=REPO, hf_branch=BRANCH))
    cfg.capture.head_sampling.seed = 11  # another head selection: another run
    with pytest.raises(QkcoreError, match=f"the Hub branch {REPO}@{BRANCH} holds run .*--replace"):
        run_sniff(cfg)
    assert _branch_files(hub_server) == published and not (tmp_path / "second").exists()
    second = run_sniff(cfg, replace=True)
    assert set(_branch_files(hub_server)) == {"README.md", "qkcore.json", *(f"{n}/data.parquet" for n in second.rows)}
    assert _branch_files(hub_server) == _local_files(second.data_root)  # the first run's configs are gone
    assert set(first.rows) != set(second.rows)


def test_pull_write_push_pull_gives_the_same_bytes_and_leaves_other_branches_alone(tiny_config, tmp_path, hub_server) -> None:
    other = run_sniff(load_config(_config(tiny_config, tmp_path, "other", 1, hf_repo_id=REPO, hf_branch="other-model")))
    other_branch = _branch_files(hub_server, "other-model")
    result = run_sniff(load_config(_config(tiny_config, tmp_path, "out", 2, hf_repo_id=REPO, hf_branch=BRANCH)))
    assert result.action == "captured" and _branch_files(hub_server) == _local_files(result.data_root)
    # The same run into a fresh root: pulled from the branch (checked against its manifest), not captured again.
    fresh = run_sniff(load_config(_config(tiny_config, tmp_path, "fresh", 2, hf_repo_id=REPO, hf_branch=BRANCH)))
    assert fresh.action == "pulled" and fresh.rows == result.rows
    assert LocalDataRoot(fresh.data_root).read_record().summary.model == "test/tiny"
    assert _local_files(fresh.data_root) == _local_files(result.data_root) == _branch_files(hub_server)
    assert _pushed(fresh.data_root) and LocalDataRoot(fresh.data_root).verify(LocalDataRoot(fresh.data_root).read_record(), full=True) == []
    assert run_sniff(load_config(_config(tiny_config, tmp_path, "fresh", 2, hf_repo_id=REPO, hf_branch=BRANCH))).action == "already complete"
    assert _branch_files(hub_server, "other-model") == other_branch == _local_files(other.data_root)


def test_push_failure_keeps_files_and_push_command_retries(tiny_config, tmp_path, hub_server) -> None:
    config = _config(tiny_config, tmp_path, "out", 2, hf_repo_id=REPO, hf_branch=BRANCH, hub_retries=1)
    hub_server.fail(500, times=1000, path=f"/commit/{BRANCH}$")
    with pytest.raises(QkcoreError, match="qkcore push --config") as error:
        run_sniff(load_config(config))
    assert f"{REPO}@{BRANCH}" in str(error.value) and "HTTP 500" in str(error.value)
    root = tmp_path / "out"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("data.parquet"))
    assert files and (root / "README.md").is_file() and not _pushed(root)
    assert hub_server.head(REPO, BRANCH) == hub_server.head(REPO, "main")  # no commit reached the branch

    # The same config again: the run is complete, nothing is captured or rewritten; only the push is retried.
    before = {f: (root / f).stat().st_mtime_ns for f in files}
    with pytest.raises(QkcoreError, match="push failed"):
        run_sniff(load_config(config))
    assert before == {f: (root / f).stat().st_mtime_ns for f in files}

    # Another capture into this root would replace the unpushed run: it refuses and says what to do.
    with pytest.raises(QkcoreError, match="never pushed"):
        run_sniff(load_config(config, overrides=["capture.head_sampling.seed=9"]))

    hub_server.clear_failures()
    assert main(["push", "--config", str(config)]) == 0
    assert _branch_files(hub_server) == _local_files(root)
    assert set(_branch_files(hub_server)) == {"README.md", "qkcore.json", *files}
    assert _pushed(root)


@pytest.mark.slow
def test_push_command_in_a_subprocess_reaches_the_hub_from_the_environment(tiny_config, tmp_path, hub_server) -> None:
    result = run_sniff(load_config(_config(tiny_config, tmp_path, "out", 2)))  # written, never pushed
    config = _config(tiny_config, tmp_path, "out", 2, hf_repo_id=REPO, hf_branch=BRANCH)  # same root
    done = subprocess.run([sys.executable, "-m", "qkcore", "push", "--config", str(config)],
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _branch_files(hub_server) == _local_files(result.data_root)
    assert _pushed(result.data_root)

    # Someone added a file to the branch: the push must commit again (to remove it), and that commit fails.
    hub_server.commit(REPO, BRANCH, {**_branch_files(hub_server), "notes.txt": b"stray"})
    hub_server.fail(500, times=1000, path=f"/commit/{BRANCH}$")
    done = subprocess.run([sys.executable, "-m", "qkcore", "push", "--config", str(config),
                           "--set", "output.hub_retries=0"],
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("qkcore: error:")]
    assert len(errors) == 1 and f"{REPO}@{BRANCH}: push failed" in errors[0] and "HTTP 500" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_push_without_repo_is_a_clear_error(tiny_config, capsys) -> None:
    config = tiny_config()
    assert main(["push", "--config", str(config)]) == 2
    assert "output.hf_repo_id" in capsys.readouterr().err


def test_int32_id_collisions_are_reported_in_log_and_card(tiny_config, tmp_path) -> None:
    # 1 and 2**32 + 1 are distinct 64-bit ids with the same low 32 bits (the written column).
    corpus = write_corpus(tmp_path / "collide.jsonl", [(1, "First document."), (2**32 + 1, "Second document.")])
    result = run_sniff(load_config(tiny_config(dataset={"path": str(corpus)})))
    front, body = read_front_matter(result.data_root / "README.md")
    notes = front["qkcore"]["models"][0]["notes"]
    assert any("int32 example_id" in note and "1 " in note for note in notes), notes
    table = pq.read_table(result.data_root / "l00h00q" / "data.parquet")
    assert set(table.column("example_id").to_pylist()) == {1}
