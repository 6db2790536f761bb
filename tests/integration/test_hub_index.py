"""The index of run branches in a Hub repo's main README, on the local Hub server.

Every push adds its branch to main's README in one commit touching only that file; racing
pushes lose no entry (the commit names its parent and is retried on a conflict); and
``qkcore compare owner/repo`` finds the runs through that index.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi

from qkcore.analysis.compare import resolve_runs
from qkcore.cli import main
from qkcore.errors import QkcoreError
from qkcore.hub import HubSync, main_branch_readme
from qkcore.hub_index import IndexEntry, parse_index, read_index, update_index
from qkcore.output import LocalDataRoot
from tests.hub_server import hub_server  # noqa: F401 (fixture)
from tests.integration.test_compare import FAST, make_run

REPO = "lab/smollm3-checkpoints"
HEADS = {0: [0, 1], 1: [0, 1]}


def _push(root: Path, branch: str) -> str:
    sync = HubSync(REPO, branch, timeout_s=5.0, retries=1, backoff_s=0.01)
    return sync.push(root, LocalDataRoot(root).dataset_files(), f"qkcore: {branch}")


@pytest.fixture
def two_runs(tmp_path) -> dict[str, Path]:
    return {
        "stage1-step-40000": make_run(tmp_path / "a", "stage1-step-40000", 4096, "a" * 16, heads=HEADS),
        "lc-4k-to-32k-step-4000": make_run(tmp_path / "b", "lc-4k-to-32k-step-4000", 32768, "b" * 16, heads=HEADS, seed=1),
    }


def test_two_pushes_are_both_listed_and_leave_every_other_branch_alone(hub_server, two_runs) -> None:
    (first, root_a), (second, root_b) = two_runs.items()
    _push(root_a, first)
    branch_a = hub_server.files(REPO, first)
    head_a = hub_server.head(REPO, first)
    _push(root_b, second)
    assert hub_server.files(REPO, first) == branch_a and hub_server.head(REPO, first) == head_a  # byte-identical

    readme = hub_server.files(REPO, "main")["README.md"].decode()
    assert readme.startswith(main_branch_readme(REPO))
    entries = {e.branch: e for e in parse_index(readme)}
    assert set(entries) == {first, second}
    assert entries[first] == IndexEntry(first, "HuggingFaceTB/SmolLM3-3B-checkpoints", first, "a" * 16, 6, 6 * 1536,
                                        "viktoroo/longbench-pro-128k-plus (test)", "2026-01-01T00:00:00+00:00", "l00h00q")
    for branch in (first, second):
        assert f'load_dataset("{REPO}", "l00h00q", revision="{branch}", split="train")' in readme
        assert f"| `{branch}` | HuggingFaceTB/SmolLM3-3B-checkpoints | {branch} |" in readme
    # Each index commit on main touched main's README and nothing else.
    history = hub_server.history(REPO, "main")
    index_commits = [c for c in history if "index of run branches" in c.message]
    assert len(index_commits) == 2
    for commit in index_commits:
        parent = hub_server.repos[REPO].commits[commit.parent].files
        changed = {p for p in {*commit.files, *parent} if commit.files.get(p) != parent.get(p)}
        assert changed == {"README.md"}


def test_racing_pushes_lose_no_entry(hub_server, two_runs, tmp_path) -> None:
    """Another push lands its index commit between this one's read and its commit: both entries survive."""
    (first, root_a), (second, root_b) = two_runs.items()
    _push(root_a, first)
    racer = make_run(tmp_path / "c", "stage2-step-4200000", 4096, "c" * 16, heads=HEADS, seed=2)
    _push(racer, "stage2-step-4200000")
    raced = []

    def land_the_other_index_first(repo_id: str, branch: str) -> None:
        if branch == "main" and not raced:
            raced.append(True)  # once: the other writer's index commit moves main under this one
            update_index(HfApi(), REPO, IndexEntry("stage2-step-4200000", "other/model", run_key="c" * 16))

    hub_server.before_commit = land_the_other_index_first
    _push(root_b, second)
    hub_server.before_commit = None
    assert raced
    entries = {e.branch: e for e in parse_index(hub_server.files(REPO, "main")["README.md"].decode())}
    assert set(entries) == {first, second, "stage2-step-4200000"}
    assert entries["stage2-step-4200000"].model == "other/model"  # the racer's write was kept, not overwritten
    commits = [path for method, path in hub_server.requests if method == "POST" and path.endswith("/commit/main")]
    assert len(commits) == 5  # two earlier pushes, then the racer's, the refused one (412) and its retry


def test_compare_owner_repo_reads_the_index(hub_server, two_runs, tmp_path, monkeypatch) -> None:
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # read at import from HF_DATASETS_OFFLINE
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub_server.url)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    (first, root_a), (second, root_b) = two_runs.items()
    _push(root_a, first)
    _push(root_b, second)
    refs = resolve_runs([REPO])
    assert [(r.kind, r.location, r.revision) for r in refs] == [("hub", REPO, second), ("hub", REPO, first)]
    out = tmp_path / "cmp"
    assert main(["compare", REPO, "--out", str(out), *FAST]) == 0
    rows = (out / "head_plasticity.csv").read_text(encoding="utf-8").splitlines()
    assert [line.split(",")[0] for line in rows[1:]][:: len(HEADS) * 2] == [first, second]  # by stage, then step
    assert f"`{REPO}@{first}`" in (out / "README.md").read_text(encoding="utf-8")


def test_a_repo_without_an_index_is_one_clear_error(hub_server) -> None:
    hub_server.create_repo("lab/plain")
    with pytest.raises(QkcoreError, match="no qkcore index of run branches.*lab/plain@BRANCH"):
        read_index("lab/plain")
    with pytest.raises(QkcoreError, match="could not be read"):
        read_index("lab/missing")


def test_a_damaged_index_names_its_way_out() -> None:
    with pytest.raises(QkcoreError, match="delete the text between"):
        parse_index("<!-- qkcore:index:start -->\n<!-- qkcore:index {not json -->\n<!-- qkcore:index:end -->")


def test_an_order_file_picks_a_whole_repos_runs(hub_server, two_runs, tmp_path, monkeypatch) -> None:
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub_server.url)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    for branch, root in two_runs.items():
        _push(root, branch)
    order = tmp_path / "order.yaml"
    order.write_text("runs:\n- {run: lc-4k-to-32k-step-4000, label: long context}\n", encoding="utf-8")
    from qkcore.analysis.compare import compare_runs
    from qkcore.analysis.plasticity import PlasticityConfig

    result = compare_runs([REPO], tmp_path / "cmp", PlasticityConfig(pairs_per_bucket=32), order=str(order), workers=1,
                          progress=False)
    assert [(r.label, r.ref.revision) for r in result.runs] == [("long context", "lc-4k-to-32k-step-4000")]


def test_the_smollm3_order_file_names_the_protocols_ten_checkpoints() -> None:
    import yaml

    from tests.conftest import REPO as CHECKOUT

    order = yaml.safe_load((CHECKOUT / "configs" / "compare" / "smollm3-checkpoints.yaml").read_text())
    revisions = {yaml.safe_load(p.read_text())["model"]["revision"]
                 for p in (CHECKOUT / "configs" / "attention-plasticity" / "smollm3-checkpoints").glob("*.yaml")}
    assert [item["run"] for item in order["runs"]] == sorted(revisions, key=_step_order)
    assert len(revisions) == 10


def _step_order(revision: str) -> tuple:
    from qkcore.analysis.compare import stage_sort_key
    from qkcore.analysis.provenance import parse_checkpoint

    stage, step = parse_checkpoint(revision)
    return stage_sort_key(stage), step
