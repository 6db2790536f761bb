"""HubSync against a local Hub server: preflight, push, download, and every failure mode.

The server (``tests/hub_server.py``) speaks the HTTP API huggingface_hub 2.4 uses, so these
tests run the real client code path from ``HfApi`` down to the socket.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, RepoFile

from qkcore.config import load_config
from qkcore.errors import QkcoreError
from qkcore.layout import is_dataset_file
from qkcore.hub import (
    GITATTRIBUTES,
    BranchState,
    HubSync,
    RemoteFile,
    hub_sync,
    main_branch_readme,
)
from qkcore.output import LocalDataRoot
from tests.hub_server import HubServer, hub_server, point_hub_at  # noqa: F401 (fixture)

REPO = "lab/sniffed-qk"
BRANCH = "tiny-llama"
FILES = {
    "README.md": b"---\nconfigs: []\n---\n# card of tiny-llama\n",
    "l00h00q/data.parquet": b"PAR1" + bytes(range(256)) * 40 + b"PAR1",
    "l00h01k/data.parquet": b"PAR1 another config PAR1",
}


def _sync(branch: str | None = BRANCH, repo: str = REPO, **kwargs) -> HubSync:
    options = {"timeout_s": 5.0, "retries": 2, "backoff_s": 0.01, **kwargs}
    return HubSync(repo, branch, **options)


def _root(path: Path, files: dict[str, bytes] = FILES) -> Path:
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _count(server: HubServer, method: str, fragment: str) -> int:
    return sum(1 for m, path in server.requests if m == method and fragment in path)


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


# -- the server speaks the protocol ----------------------------------------------------------------


def test_huggingface_hub_round_trip_against_the_local_server(hub_server, tmp_path) -> None:
    hub_server.page_size = 2  # the tree listing below spans pages: the Link header is followed
    api = HfApi()
    assert api.endpoint == hub_server.url
    assert api.whoami()["name"] == hub_server.user
    api.create_repo(REPO, repo_type="dataset", exist_ok=True)
    api.create_repo(REPO, repo_type="dataset", exist_ok=True)  # 409 taken as "exists"
    api.create_branch(REPO, repo_type="dataset", branch=BRANCH, exist_ok=True)
    api.create_branch(REPO, repo_type="dataset", branch=BRANCH, exist_ok=True)
    first = api.create_commit(
        REPO, repo_type="dataset", revision=BRANCH, commit_message="add",
        operations=[CommitOperationAdd(path, data) for path, data in FILES.items()],
    )
    second = api.create_commit(
        REPO, repo_type="dataset", revision=BRANCH, commit_message="drop one",
        operations=[CommitOperationDelete("l00h01k/data.parquet")],
    )
    refs = {ref.name: ref.target_commit for ref in api.list_repo_refs(REPO, repo_type="dataset").branches}
    assert refs[BRANCH] == second.oid == hub_server.head(REPO, BRANCH) and "main" in refs
    tree = [e for e in api.list_repo_tree(REPO, repo_type="dataset", revision=BRANCH, recursive=True)
            if isinstance(e, RepoFile)]
    assert sorted(e.path for e in tree) == [GITATTRIBUTES, "README.md", "l00h00q/data.parquet"]
    assert next(e for e in tree if e.path.endswith(".parquet")).lfs is not None  # described like Hub LFS files
    # hf_hub_download (HEAD for metadata, then GET) at the older commit still sees the deleted file.
    old = api.hf_hub_download(REPO, "l00h01k/data.parquet", repo_type="dataset", revision=first.oid,
                              cache_dir=tmp_path / "cache")
    assert Path(old).read_bytes() == FILES["l00h01k/data.parquet"]
    card = api.hf_hub_download(REPO, "README.md", repo_type="dataset", revision=BRANCH, cache_dir=tmp_path / "cache")
    assert Path(card).read_bytes() == FILES["README.md"]
    assert api.dataset_info(REPO, revision=BRANCH).sha == second.oid
    assert hub_server.files(REPO, "main") == {GITATTRIBUTES: hub_server.files(REPO, "main")[GITATTRIBUTES]}


# -- preflight --------------------------------------------------------------------------------------


def test_preflight_on_missing_repo_missing_branch_and_existing_branch(hub_server) -> None:
    assert _sync().preflight() == BranchState(False, False, None, (), None)

    hub_server.create_repo(REPO)
    assert _sync().preflight() == BranchState(True, False, None, (), None)

    head = hub_server.commit(REPO, BRANCH, FILES)
    hub_server.requests.clear()
    state = _sync().preflight()
    assert state.repo_exists and state.branch_exists and state.commit == head
    assert state.files == tuple(sorted([GITATTRIBUTES, *FILES]))
    assert state.card == FILES["README.md"].decode()
    # The card is the only file fetched.
    assert [p for m, p in hub_server.requests if "/resolve/" in p] == [f"/datasets/{REPO}/resolve/{head}/README.md"]


def test_preflight_without_a_token_says_how_to_set_one(hub_server, monkeypatch, tmp_path) -> None:
    point_hub_at(hub_server.url, None, monkeypatch, tmp_path)
    with pytest.raises(QkcoreError) as error:
        _sync().preflight()
    text = _one_line(error)
    assert f"{REPO}@{BRANCH}" in text and "HF_TOKEN" in text and "hf auth login" in text
    assert hub_server.requests == []


def test_preflight_refuses_a_read_only_token_and_a_namespace_it_cannot_create_in(hub_server) -> None:
    with pytest.raises(QkcoreError, match="cannot create it: 'someone-else'"):
        _sync(repo="someone-else/qk").preflight()
    hub_server.role = "read"
    with pytest.raises(QkcoreError, match="read-only"):
        _sync().preflight()


# -- push -------------------------------------------------------------------------------------------


def test_push_creates_repo_and_branch_seeds_main_and_mirrors_the_root(hub_server, tmp_path) -> None:
    root = _root(tmp_path / "root")
    commit = _sync().push(root, LocalDataRoot(root).dataset_files(), "qkcore: tiny")
    assert commit == hub_server.head(REPO, BRANCH)
    branch = hub_server.files(REPO, BRANCH)
    assert branch.pop(GITATTRIBUTES) and branch == FILES
    main = hub_server.files(REPO, "main")
    # main explains the branches and lists this one (hub_index.py; test_hub_index.py for the index itself).
    assert main["README.md"].decode().startswith(main_branch_readme(REPO)) and f"| `{BRANCH}` |" in main["README.md"].decode()
    # One commit on the branch, made on top of main (where the branch started, before the index commit).
    history = hub_server.history(REPO, BRANCH)
    assert history[0].message == "qkcore: tiny" and history[1].oid == hub_server.history(REPO, "main")[1].oid


def test_push_deletes_stale_files_keeps_other_branches_and_seeds_main_once(hub_server, tmp_path) -> None:
    hub_server.commit(REPO, BRANCH, {"README.md": b"old card", "l05h00q/data.parquet": b"old", "notes.txt": b"x"})
    other = hub_server.commit(REPO, "other-model", {"README.md": b"other card", "l00h00q/data.parquet": b"other"})
    other_files = hub_server.files(REPO, "other-model")
    root = _root(tmp_path / "root")
    sync = _sync()
    sync.push(root, LocalDataRoot(root).dataset_files(), "first")
    (root / "l00h01k" / "data.parquet").unlink()  # the root changed: the branch follows
    sync.push(root, LocalDataRoot(root).dataset_files(), "second")

    branch = hub_server.files(REPO, BRANCH)
    assert set(branch) == {GITATTRIBUTES, "README.md", "l00h00q/data.parquet"}
    assert hub_server.head(REPO, "other-model") == other and hub_server.files(REPO, "other-model") == other_files
    # The second push left the branch's entry as it was (same card): main's index was written once.
    seeds = [c for c in hub_server.history(REPO, "main") if "index of run branches" in c.message]
    assert len(seeds) == 1


def test_push_keeps_an_existing_main_readme_and_pushes_to_main_without_an_index(hub_server, tmp_path) -> None:
    hub_server.commit(REPO, "main", {"README.md": b"the lab's own words"})
    root = _root(tmp_path / "root")
    _sync().push(root, LocalDataRoot(root).dataset_files(), "m")
    readme = hub_server.files(REPO, "main")["README.md"].decode()
    assert readme.startswith("the lab's own words\n\n<!-- qkcore:index:start -->") and f"| `{BRANCH}` |" in readme

    _sync(branch=None, repo="lab/single").push(root, LocalDataRoot(root).dataset_files(), "to main")
    main = hub_server.files("lab/single", "main")
    assert main.pop(GITATTRIBUTES) and main == FILES
    assert [c.message for c in hub_server.history("lab/single", "main")][:1] == ["to main"]


def test_push_checks_the_commit_against_the_local_files(hub_server, tmp_path) -> None:
    def corrupt(files: dict[str, bytes]) -> None:
        if "l00h00q/data.parquet" in files:
            files["l00h00q/data.parquet"] = b"X" + files["l00h00q/data.parquet"][1:]

    hub_server.tamper = corrupt
    root = _root(tmp_path / "root")
    before = _snapshot(root)
    with pytest.raises(QkcoreError) as error:
        _sync().push(root, LocalDataRoot(root).dataset_files(), "m")
    text = _one_line(error)
    assert "does not mirror the root: differing ['l00h00q/data.parquet']" in text
    assert "every local file is kept" in text and _snapshot(root) == before


def test_push_refuses_before_any_request_what_is_not_a_dataset(hub_server, tmp_path) -> None:
    root = _root(tmp_path / "root", {**FILES, "notes.txt": b"x"})
    with pytest.raises(QkcoreError, match="not dataset files"):
        _sync().push(root, [*LocalDataRoot(root).dataset_files(), "notes.txt"], "m")
    with pytest.raises(QkcoreError, match="missing under"):
        _sync().push(root, ["l09h09q/data.parquet"], "m")
    with pytest.raises(QkcoreError, match="nothing to push"):
        _sync().push(root, ["README.md"], "m")
    assert hub_server.requests == []


# -- download ---------------------------------------------------------------------------------------


def test_download_gives_the_pushed_bytes_pinned_to_the_preflight_commit_and_nothing_else(hub_server, tmp_path) -> None:
    root = _root(tmp_path / "root")
    _sync().push(root, LocalDataRoot(root).dataset_files(), "m")
    state = _sync().preflight()
    hub_server.commit(REPO, BRANCH, {"README.md": b"newer", "l00h00q/data.parquet": b"newer"})  # after preflight

    fresh = tmp_path / "fresh"
    _sync().download(state, [f for f in state.files if is_dataset_file(f)], fresh)
    assert {p: data for p, (data, _) in _snapshot(fresh).items()} == FILES
    assert sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*")) == sorted(
        [*FILES, "l00h00q", "l00h01k"]
    )


def test_download_refuses_bytes_that_differ_from_the_branch_record_and_keeps_no_trace(hub_server, tmp_path) -> None:
    hub_server.commit(REPO, BRANCH, FILES)
    state = _sync().preflight()
    wrong = dict(state.remote)
    wrong["l00h00q/data.parquet"] = dataclasses.replace(wrong["l00h00q/data.parquet"], sha256="0" * 64)
    target = tmp_path / "target"
    with pytest.raises(QkcoreError) as error:
        _sync().download(dataclasses.replace(state, remote=wrong), ["l00h00q/data.parquet"], target)
    text = _one_line(error)
    assert "l00h00q/data.parquet" in text and "does not match" in text and f"{REPO}@{BRANCH}" in text
    assert list(target.rglob("*")) == []  # no half file, no temp file, no empty folder

    readme = dataclasses.replace(state.remote["README.md"], blob_id="f" * 40)  # a regular file: git blob id
    with pytest.raises(QkcoreError, match="does not match"):
        _sync().download(dataclasses.replace(state, remote={"README.md": readme}), ["README.md"], target)
    with pytest.raises(QkcoreError, match="not on the branch"):
        _sync().download(state, ["l07h00q/data.parquet"], target)
    assert list(target.rglob("*")) == []


def test_download_failure_leaves_no_partial_file(hub_server, tmp_path) -> None:
    hub_server.commit(REPO, BRANCH, FILES)
    state = _sync().preflight()
    hub_server.fail(500, times=100, path=r"l00h00q/data\.parquet$")
    target = tmp_path / "target"
    with pytest.raises(QkcoreError) as error:
        _sync().download(state, list(FILES), target)
    text = _one_line(error)
    assert "download of l00h00q/data.parquet failed" in text and "HTTP 500" in text
    assert not (target / "l00h00q").exists()
    assert all(not p.name.startswith(".") for p in target.rglob("*"))  # no temp file left


# -- failure modes ----------------------------------------------------------------------------------


def test_transient_500_is_retried_and_then_succeeds(hub_server, tmp_path) -> None:
    hub_server.fail(500, times=2, path="/api/whoami-v2")
    hub_server.fail(503, times=2, path="/preupload/")
    hub_server.fail(429, times=1, path="/commit/")
    root = _root(tmp_path / "root")
    assert _sync(retries=2).preflight().repo_exists is False
    assert _count(hub_server, "GET", "/api/whoami-v2") == 3
    # Retries count per step: the main README's commit meets 503, 503, 429, then succeeds.
    commit = _sync(retries=3).push(root, LocalDataRoot(root).dataset_files(), "m")
    assert commit == hub_server.head(REPO, BRANCH)
    # README commit: preupload 503, 503, then preupload ok + commit 429, then both ok; branch commit: one.
    assert _count(hub_server, "POST", "/preupload/") == 4 + 1


def test_rate_limit_waits_as_long_as_retry_after_asks(hub_server) -> None:
    hub_server.fail(429, times=1, path="/api/whoami-v2", retry_after=1)
    started = time.monotonic()
    _sync(backoff_s=0.01).preflight()
    assert time.monotonic() - started >= 1.0
    assert _count(hub_server, "GET", "/api/whoami-v2") == 2


def test_persistent_500_fails_in_one_line_after_exactly_the_configured_retries(hub_server, tmp_path) -> None:
    root = _root(tmp_path / "root")
    before = _snapshot(root)
    hub_server.fail(500, times=1000, path="/preupload/")
    with pytest.raises(QkcoreError) as error:
        _sync(retries=2).push(root, LocalDataRoot(root).dataset_files(), "m")
    text = _one_line(error)
    assert f"{REPO}@{BRANCH}: push failed" in text and "HTTP 500" in text and "gave up after 3 attempts" in text
    assert f"every local file is kept in {root}" in text and "qkcore push --config FILE" in text
    # huggingface_hub's own backoff on preupload did not multiply the attempts.
    assert _count(hub_server, "POST", "/preupload/") == 3
    assert _snapshot(root) == before


def test_unauthorised_token_fails_at_once_in_one_line(hub_server, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    with pytest.raises(QkcoreError) as error:
        _sync(retries=3).preflight()
    text = _one_line(error)
    assert f"{REPO}@{BRANCH}" in text and "401 unauthorised" in text and "HF_TOKEN" in text
    assert _count(hub_server, "GET", "/api/whoami-v2") == 1

    root = _root(tmp_path / "root")
    before = _snapshot(root)
    with pytest.raises(QkcoreError) as error:
        _sync(retries=3).push(root, LocalDataRoot(root).dataset_files(), "m")
    assert "401 unauthorised" in _one_line(error) and "every local file is kept" in str(error.value)
    assert _count(hub_server, "POST", "/api/repos/create") == 1 and _snapshot(root) == before


def test_a_server_that_never_answers_fails_after_the_timeout_not_minutes(hub_server, tmp_path) -> None:
    hub_server.hang(times=1000)
    started = time.monotonic()
    with pytest.raises(QkcoreError) as error:
        _sync(timeout_s=0.5, retries=1).preflight()
    elapsed = time.monotonic() - started
    text = _one_line(error)
    assert "timed out after 0.5 s" in text and "gave up after 2 attempts" in text and f"{REPO}@{BRANCH}" in text
    assert elapsed < 5, elapsed

    hub_server.clear_failures()
    hub_server.hang(times=1, path="/commit/")  # one lost answer during the push: the retry recovers
    root = _root(tmp_path / "root")
    commit = _sync(timeout_s=0.5, retries=1).push(root, LocalDataRoot(root).dataset_files(), "m")
    assert commit == hub_server.head(REPO, BRANCH)


def test_offline_mode_and_no_connection_say_the_hub_cannot_be_reached(hub_server, monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(QkcoreError) as error:
        _sync().preflight()
    assert "cannot be reached" in _one_line(error) and "HF_HUB_OFFLINE" in str(error.value)
    assert hub_server.requests == []

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    closed = HubServer().start()
    url = closed.url
    closed.stop()  # nothing listens there any more
    root = _root(tmp_path / "root")
    with pytest.raises(QkcoreError) as error:
        _sync(api=HfApi(endpoint=url), retries=1).push(root, LocalDataRoot(root).dataset_files(), "m")
    text = _one_line(error)
    assert f"the Hub cannot be reached at {url}" in text and "every local file is kept" in text


# -- configuration ----------------------------------------------------------------------------------


def test_hub_sync_takes_timeout_and_retries_from_the_output_config(tiny_config) -> None:
    assert hub_sync(load_config(tiny_config()).output) is None
    cfg = load_config(tiny_config(output={"hf_repo_id": REPO, "hf_branch": BRANCH}))
    sync = hub_sync(cfg.output)
    assert (sync.repo_id, sync.branch, sync.timeout_s, sync.retries) == (REPO, BRANCH, 60.0, 5)
    cfg = load_config(tiny_config(output={"hf_repo_id": REPO, "hub_timeout_s": 2.5, "hub_retries": 0}))
    sync = hub_sync(cfg.output)
    assert (sync.branch, sync.timeout_s, sync.retries) == ("main", 2.5, 0)


def test_dataset_files_are_the_card_and_canonical_configs(tmp_path) -> None:
    root = _root(tmp_path, {**FILES, "notes.txt": b"x", "l1h1q/data.parquet": b"x", ".qkcore-runs/a.json": b"{}"})
    assert LocalDataRoot(root).dataset_files() == ["README.md", "l00h00q/data.parquet", "l00h01k/data.parquet"]
    assert all(is_dataset_file(f) for f in LocalDataRoot(root).dataset_files())
    assert not any(is_dataset_file(f) for f in (GITATTRIBUTES, "notes.txt", "l1h1q/data.parquet", "x/README.md"))


def test_remote_file_digest_matches_what_the_server_records(hub_server) -> None:
    hub_server.commit(REPO, BRANCH, FILES)
    state = _sync().preflight()
    assert state.remote["l00h00q/data.parquet"].sha256 is not None  # LFS: sha256 of the content
    assert state.remote["README.md"] == RemoteFile(len(FILES["README.md"]), state.remote["README.md"].blob_id, None)
