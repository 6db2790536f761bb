"""Real data in, Hub dataset out: string ids, uneven lengths, batching, branch-per-model push.

The Hub is replaced at the ``HfApi`` boundary by a recording fake; everything
above it (pull → write → push, one commit) is the code path real runs use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import load_dataset

from qkcore.card import read_front_matter
from qkcore.cli import main
from qkcore.config import load_config
from qkcore.errors import QkcoreError
from qkcore.hub import PENDING_MARKER
from qkcore.sniff import run_sniff
from tests.conftest import write_corpus

UNEVEN = [
    ("alpha", "Short."),
    ("beta-β", "A rather longer document about tide gauges, sluices, and what the curve of a flood looks like."),
    ("γ", "Medium length text about pendulum clocks and rating nuts."),
    ("delta", "x" * 300),
    ("epsilon", "Two sentences here. The second one is a little longer than the first."),
    ("zeta", "Another one, about looms: warp threads wound onto the back beam under even tension."),
    ("eta", "The end."),
]


class RecordingHub:
    """A fake ``HfApi``: a dict of branches → {path: bytes}, and a log of every call."""

    def __init__(self, remote: dict[str, dict[str, bytes]] | None = None, fail_commit: bool = False) -> None:
        self.remote = remote or {}
        self.calls: list[tuple] = []
        self.commits: list[dict] = []
        self.fail_commit = fail_commit
        self.repo = bool(self.remote)

    def repo_exists(self, repo_id, repo_type=None):
        self.calls.append(("repo_exists", repo_id))
        return self.repo

    def revision_exists(self, repo_id, revision, repo_type=None):
        self.calls.append(("revision_exists", revision))
        return revision in self.remote

    def snapshot_download(self, repo_id, repo_type, revision, local_dir, allow_patterns):
        self.calls.append(("snapshot_download", revision))
        for path, data in self.remote[revision].items():
            target = Path(local_dir) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def create_repo(self, repo_id, repo_type, private, exist_ok):
        self.calls.append(("create_repo", repo_id))
        self.repo = True

    def create_branch(self, repo_id, repo_type, branch, exist_ok):
        self.calls.append(("create_branch", branch))
        self.remote.setdefault(branch, {})

    def create_commit(self, repo_id, operations, commit_message, repo_type, revision):
        self.calls.append(("create_commit", revision))
        if self.fail_commit:
            raise ConnectionError("simulated network failure")
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.commits.append({"revision": revision, "files": files, "message": commit_message})
        self.remote.setdefault(revision, {}).update(files)


def _config(tiny_config, tmp_path: Path, root: str, batch_size: int, **output) -> Path:
    corpus = write_corpus(tmp_path / "uneven.jsonl", UNEVEN)
    return tiny_config(
        dataset={"path": str(corpus)},
        inference={"batch_size": batch_size},
        capture={"sampler": {"type": "uniform", "base_rate": 6}, "head_sampling": {"count": 6, "seed": 3}},
        output={"data_root": str(tmp_path / root), **output},
    )


def test_batched_run_equals_batch_one_and_pushes_one_commit(tiny_config, tmp_path) -> None:
    hub = RecordingHub()
    batched = load_config(_config(tiny_config, tmp_path, "b3", 3, hf_repo_id="lab/sniffed-qk", hf_branch="tiny-llama"))
    result = run_sniff(batched, hub_api=hub)
    single = run_sniff(load_config(_config(tiny_config, tmp_path, "b1", 1)))

    # Card lists every config, and load_dataset reads each; rows equal the batch-size-1 run.
    front, _ = read_front_matter(result.data_root / "README.md")
    names = [c["config_name"] for c in front["configs"]]
    assert sorted(names) == sorted(result.rows) == sorted(single.rows)
    for name in names:
        rows = load_dataset(str(result.data_root), name, cache_dir=str(tmp_path / "cache"))["train"]
        assert len(rows) == result.rows[name]
        _assert_same_rows(result.data_root / name / "data.parquet", single.data_root / name / "data.parquet")

    # Pull happened before the one commit, on the model's branch, with every file.
    kinds = [call[0] for call in hub.calls]
    assert kinds.index("repo_exists") < kinds.index("create_commit")
    assert len(hub.commits) == 1 and hub.commits[0]["revision"] == "tiny-llama"
    pushed = set(hub.commits[0]["files"])
    assert pushed == {"README.md", *(f"{n}/data.parquet" for n in names)}
    assert not (result.data_root / PENDING_MARKER).exists()


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


def test_pull_keeps_published_configs_and_models(tiny_config, tmp_path) -> None:
    first = run_sniff(load_config(_config(tiny_config, tmp_path, "first", 2)))
    remote = {"tiny-llama": {"README.md": (first.data_root / "README.md").read_bytes()}}
    for name in first.rows:
        remote["tiny-llama"][f"{name}/data.parquet"] = (first.data_root / name / "data.parquet").read_bytes()
    hub = RecordingHub(remote)
    cfg = load_config(_config(tiny_config, tmp_path, "second", 2, hf_repo_id="lab/x", hf_branch="tiny-llama"))
    cfg.capture.head_sampling.seed = 11  # another head selection: earlier configs must survive
    second = run_sniff(cfg, hub_api=hub)
    front, _ = read_front_matter(second.data_root / "README.md")
    listed = {c["config_name"] for c in front["configs"]}
    assert set(first.rows) | set(second.rows) == listed
    assert set(hub.commits[0]["files"]) == {"README.md", *(f"{n}/data.parquet" for n in listed)}


def test_push_failure_keeps_files_and_push_command_retries(tiny_config, tmp_path, monkeypatch, capsys) -> None:
    config = _config(tiny_config, tmp_path, "out", 2, hf_repo_id="lab/sniffed-qk", hf_branch="tiny-llama")
    with pytest.raises(QkcoreError, match="qkcore push --config"):
        run_sniff(load_config(config), hub_api=RecordingHub(fail_commit=True))
    root = tmp_path / "out"
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("data.parquet"))
    assert files and (root / "README.md").is_file() and (root / PENDING_MARKER).is_file()

    # The same config again: the run is complete, nothing is pulled, pushed or rewritten.
    idle = RecordingHub()
    before = {f: (root / f).stat().st_mtime_ns for f in files}
    run_sniff(load_config(config), hub_api=idle)
    assert idle.calls == [] and before == {f: (root / f).stat().st_mtime_ns for f in files}

    # Another capture into this root would pull over the unpushed files: it refuses and says what to do.
    with pytest.raises(QkcoreError, match="never pushed"):
        run_sniff(load_config(config, overrides=["capture.head_sampling.seed=9"]), hub_api=RecordingHub())

    hub = RecordingHub()
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: hub)
    assert main(["push", "--config", str(config)]) == 0
    assert len(hub.commits) == 1
    assert set(hub.commits[0]["files"]) == {"README.md", *files}
    assert not (root / PENDING_MARKER).exists()


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
