"""A local stand-in for the Hugging Face Hub, for tests: the part of its HTTP API that
huggingface_hub 2.4 uses to check a token, create a dataset repo and a branch, list refs
and trees, commit (files travel base64 inside the commit: preupload answers "regular")
and resolve files (GET and HEAD, with the headers ``hf_hub_download`` reads).

Repos live in memory (branch -> commit -> {path: bytes}) so tests can inspect them. Files
matching ``lfs_suffixes`` are *described* as the real Hub describes LFS files (tree entries
with ``lfs.oid`` = sha256 of the content, the blob id of the pointer file, ``X-Linked-Etag``)
although their bytes arrive inline, so clients meet both kinds of digest.

Failures can be injected: an HTTP status for the next N requests (optionally only on paths
matching a regex), or a hang (the request is accepted and never answered); ``before_commit``
lets a test land another writer's commit just before one is checked against its parent. A token other
than ``server.token`` gets 401 on every request.

The ``hub_server`` fixture starts one on 127.0.0.1 (random port) and points huggingface_hub
at it, in this process (``constants.ENDPOINT``, offline mode lifted) and for subprocesses
(``HF_ENDPOINT``, ``HF_HUB_OFFLINE=0``, ``HF_TOKEN``).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest

GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob holding ``data`` (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git-lfs pointer file that stands for ``data`` in git."""
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


@dataclass
class Commit:
    """One commit: the whole tree it leaves (path -> bytes)."""

    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    """A dataset repo: its commits and its branches (name -> head commit id)."""

    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch name or a commit id names, if any."""
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


@dataclass
class _Failure:
    kind: str  # "status" or "hang"
    remaining: int
    status: int = 500
    path: re.Pattern[str] | None = None
    retry_after: int | None = None


class HubServer:
    """An in-memory Hub on 127.0.0.1; ``start()`` it, point huggingface_hub at ``url``, ``stop()`` it."""

    def __init__(
        self,
        *,
        token: str = "hf_qkcore_test_token",
        user: str = "tester",
        orgs: tuple[str, ...] = ("lab",),
        role: str = "write",
        page_size: int = 1000,
        lfs_suffixes: tuple[str, ...] = (".parquet",),
    ) -> None:
        self.token = token
        self.user = user
        self.orgs = orgs
        self.role = role
        self.page_size = page_size
        self.lfs_suffixes = lfs_suffixes
        self.repos: dict[str, Repo] = {}
        #: Every request received, as (method, path without the query), in order.
        self.requests: list[tuple[str, str]] = []
        #: If set, called with each commit's tree before it is stored (to play a Hub that keeps other bytes).
        self.tamper: Callable[[dict[str, bytes]], None] | None = None
        #: If set, called with (repo id, branch) when a commit arrives, before it is checked against
        #: its parent (outside the lock): a test can land another writer's commit first (a race).
        self.before_commit: Callable[[str, str], None] | None = None
        self._failures: list[_Failure] = []
        self._lock = threading.RLock()
        self._released = threading.Event()  # set on stop: hung requests return
        self._counter = itertools.count()
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True).start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # -- failure injection ------------------------------------------------------------------

    def fail(self, status: int = 500, times: int = 1, path: str | None = None, retry_after: int | None = None) -> None:
        """Answer the next ``times`` requests (whose path matches regex ``path``, if given) with ``status``.

        ``retry_after`` adds a ``Retry-After`` header (seconds), as the Hub sends with 429.
        """
        with self._lock:
            self._failures.append(_Failure("status", times, status, re.compile(path) if path else None, retry_after))

    def hang(self, times: int = 1, path: str | None = None) -> None:
        """Accept the next ``times`` (matching) requests and never answer them."""
        with self._lock:
            self._failures.append(_Failure("hang", times, path=re.compile(path) if path else None))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def _next_failure(self, path: str) -> _Failure | None:
        with self._lock:
            for failure in self._failures:
                if failure.remaining > 0 and (failure.path is None or failure.path.search(path)):
                    failure.remaining -= 1
                    return failure
        return None

    # -- inspection and seeding --------------------------------------------------------------

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """The tree at the head of ``branch`` (path -> bytes)."""
        with self._lock:
            commit = self.repos[repo_id].resolve(branch)
            assert commit is not None, f"no branch {branch} in {repo_id}"
            return dict(commit.files)

    def history(self, repo_id: str, branch: str = "main") -> list[Commit]:
        """The commits of ``branch``, newest first."""
        with self._lock:
            repo = self.repos[repo_id]
            commits, oid = [], repo.branches[branch]
            while oid is not None:
                commits.append(repo.commits[oid])
                oid = repo.commits[oid].parent
            return commits

    def head(self, repo_id: str, branch: str = "main") -> str:
        with self._lock:
            return self.repos[repo_id].branches[branch]

    def create_repo(self, repo_id: str, private: bool = False) -> Repo:
        """A new repo whose ``main`` holds ``.gitattributes``, as the Hub makes it."""
        with self._lock:
            repo = Repo(repo_id, private)
            initial = self._new_commit(None, "initial commit", {".gitattributes": GITATTRIBUTES})
            repo.commits[initial.oid] = initial
            repo.branches["main"] = initial.oid
            self.repos[repo_id] = repo
            return repo

    def commit(self, repo_id: str, branch: str, files: dict[str, bytes], message: str = "seed") -> str:
        """Make ``branch`` (created from main if missing) hold exactly ``files`` plus main's .gitattributes."""
        with self._lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id)
            base = repo.resolve(branch) or repo.resolve("main")
            tree = {".gitattributes": base.files[".gitattributes"]} if ".gitattributes" in base.files else {}
            tree.update(files)
            new = self._new_commit(base.oid, message, tree)
            repo.commits[new.oid] = new
            repo.branches[branch] = new.oid
            return new.oid

    def _new_commit(self, parent: str | None, message: str, files: dict[str, bytes]) -> Commit:
        digest = hashlib.sha1()
        digest.update(f"{next(self._counter)}\0{parent}\0{message}".encode())
        for path in sorted(files):
            digest.update(f"\0{path}\0{git_blob_id(files[path])}".encode())
        return Commit(digest.hexdigest(), parent, message, dict(files))

    # -- descriptions as the Hub gives them ---------------------------------------------------

    def _is_lfs(self, path: str) -> bool:
        return path.endswith(self.lfs_suffixes)

    def tree_entry(self, path: str, data: bytes) -> dict[str, Any]:
        if self._is_lfs(path):
            pointer = lfs_pointer(data)
            return {
                "type": "file", "path": path, "size": len(data), "oid": git_blob_id(pointer),
                "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)},
            }
        return {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}

    def file_headers(self, commit: Commit, path: str) -> dict[str, str]:
        data = commit.files[path]
        headers = {"X-Repo-Commit": commit.oid, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if self._is_lfs(path):
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"ETag": f'"{sha}"', "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
        else:
            headers["ETag"] = f'"{git_blob_id(data)}"'
        return headers


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


_REPO = r"/api/datasets/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern + "$"), handler)
    for method, pattern, handler in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", _REPO, "repo_info"),
        ("GET", _REPO + r"/revision/(?P<rev>[^/]+)", "repo_info"),
        ("GET", _REPO + r"/refs", "refs"),
        ("GET", _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
        ("POST", _REPO + r"/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", _REPO + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", _REPO + r"/commit/(?P<rev>[^/]+)", "commit"),
        ("GET", r"/datasets/(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", r"/datasets/(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]


class _Handler(BaseHTTPRequestHandler):
    """One request against :attr:`hub` (a :class:`HubServer`, set on the subclass)."""

    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (quiet test output)
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    # -- plumbing ----------------------------------------------------------------------------

    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        with self.hub._lock:
            self.hub.requests.append((method, split.path))
        failure = self.hub._next_failure(split.path)
        if failure is not None and failure.kind == "hang":
            self.hub._released.wait()  # never answer; the client's timeout is what ends this
            self.close_connection = True
            return
        try:
            if failure is not None:
                raise _HttpError(failure.status, f"injected failure ({failure.status})", retry_after=failure.retry_after)
            self._check_token()
            for route_method, pattern, name in _ROUTES:
                match = pattern.match(split.path)
                if route_method == method and match:
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    status, body, headers = getattr(self, name)(**params)
                    break
            else:
                raise _HttpError(404, f"no such endpoint: {method} {split.path}")
        except _HttpError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            retry_after = err.extra.pop("retry_after", None)
            if retry_after is not None:
                headers["Retry-After"] = str(retry_after)
            status, body = err.status, {"error": err.message, **err.extra}
        self._respond(method, status, body, headers)

    def _respond(self, method: str, status: int, body: Any, headers: dict[str, str]) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        headers.setdefault("Content-Type", "application/json")
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _given_token(self) -> str | None:
        value = self.headers.get("Authorization") or ""
        return value[len("Bearer "):] if value.startswith("Bearer ") else None

    def _check_token(self) -> None:
        token = self._given_token()
        if token is not None and token != self.hub.token:
            raise _HttpError(401, INVALID_CREDENTIALS)

    def _require_token(self) -> None:
        if self._given_token() is None:
            raise _HttpError(401, "You must be authenticated to do this")

    def _repo(self, ns: str, name: str) -> Repo:
        repo = self.hub.repos.get(f"{ns}/{name}")
        if repo is None or (repo.private and self._given_token() is None):
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # -- endpoints (each returns status, body, headers) ------------------------------------------

    def whoami(self):
        self._require_token()
        hub = self.hub
        return 200, {
            "type": "user", "name": hub.user, "orgs": [{"name": org, "type": "org"} for org in hub.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": hub.role}},
        }, {}

    def validate_yaml(self):
        return 200, {"errors": [], "warnings": []}, {}

    def create_repo(self):
        self._require_token()
        payload = json.loads(self.body or b"{}")
        if payload.get("type") != "dataset":
            raise _HttpError(400, "this test server only holds dataset repos")
        namespace = payload.get("organization") or self.hub.user
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.hub.url}/datasets/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                raise _HttpError(409, "You already created this dataset repo", url=url)  # as the Hub answers
            if namespace not in (self.hub.user, *self.hub.orgs):
                raise _HttpError(403, f"You don't have the rights to create a dataset under the namespace {namespace}")
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.create_repo(repo_id, private=private)
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def repo_info(self, ns: str, name: str, rev: str = "main"):
        with self.hub._lock:
            repo = self._repo(ns, name)
            commit = self._commit_at(repo, rev)
            siblings = [{"rfilename": path} for path in sorted(commit.files)]
        return 200, {
            "id": repo.repo_id, "sha": commit.oid, "private": repo.private, "siblings": siblings,
            "lastModified": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        }, {}

    def refs(self, ns: str, name: str):
        with self.hub._lock:
            repo = self._repo(ns, name)
            branches = [
                {"name": branch, "ref": f"refs/heads/{branch}", "targetCommit": oid}
                for branch, oid in sorted(repo.branches.items(), key=lambda item: (item[0] != "main", item[0]))
            ]
        return 200, {"branches": branches, "converts": [], "tags": []}, {}

    def tree(self, ns: str, name: str, rev: str, path: str = ""):
        with self.hub._lock:
            commit = self._commit_at(self._repo(ns, name), rev)
            files = dict(commit.files)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        entries: dict[str, dict[str, Any]] = {}
        for file_path in sorted(files):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                if recursive or depth == 1:
                    folder = prefix + "/".join(parts[:depth])
                    entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0, "oid": "0" * 40})
            if recursive or len(parts) == 1:
                entries[file_path] = self.hub.tree_entry(file_path, files[file_path])
        if prefix and not entries:
            raise _HttpError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        listing = sorted(entries.values(), key=lambda entry: (entry["type"] != "directory", entry["path"]))
        start = int(self.query.get("cursor", 0))
        page = listing[start:start + self.hub.page_size]
        headers = {}
        if start + self.hub.page_size < len(listing):
            query = dict(self.query, cursor=str(start + self.hub.page_size))
            headers["Link"] = f'<{self.hub.url}{urlsplit(self.path).path}?{urlencode(query)}>; rel="next"'
        return 200, page, headers

    def create_branch(self, ns: str, name: str, branch: str):
        self._require_token()
        payload = json.loads(self.body or b"{}")
        with self.hub._lock:
            repo = self._repo(ns, name)
            if branch in repo.branches:
                raise _HttpError(409, f"Reference refs/heads/{branch} already exists")
            start = self._commit_at(repo, payload.get("startingPoint") or "main")
            repo.branches[branch] = start.oid
        return 200, {}, {}

    def preupload(self, ns: str, name: str, rev: str):
        self._require_token()
        payload = json.loads(self.body)
        with self.hub._lock:
            repo = self._repo(ns, name)
            current = repo.resolve(rev)
            existing = current.files if current is not None else {}
        files = [
            {
                "path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                "oid": git_blob_id(existing[item["path"]]) if item["path"] in existing else None,
            }
            for item in payload["files"]
        ]
        return 200, {"files": files, "commitOid": current.oid if current else None}, {}

    def commit(self, ns: str, name: str, rev: str):
        self._require_token()
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "the first line of a commit must be its header")
        header = lines[0]["value"]
        if self.hub.before_commit is not None:
            self.hub.before_commit(f"{ns}/{name}", rev)
        with self.hub._lock:
            repo = self._repo(ns, name)
            if rev not in repo.branches:
                raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo.commits[repo.branches[rev]]
            if header.get("parentCommit") not in (None, head.oid):
                raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise _HttpError(400, "file content must be base64")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise _HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(folder)}
                else:
                    raise _HttpError(400, f"this test server does not take '{key}' operations (preupload said regular)")
            if self.hub.tamper is not None:
                self.hub.tamper(files)
            new = self.hub._new_commit(head.oid, header.get("summary", ""), files)
            repo.commits[new.oid] = new
            repo.branches[rev] = new.oid
        return 200, {
            "success": True, "commitOid": new.oid,
            "commitUrl": f"{self.hub.url}/datasets/{repo.repo_id}/commit/{new.oid}", "hookOutput": "",
        }, {}

    def resolve(self, ns: str, name: str, rev: str, path: str):
        with self.hub._lock:
            commit = self._commit_at(self._repo(ns, name), rev)
            if path not in commit.files:
                raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound")
            data, headers = commit.files[path], self.hub.file_headers(commit, path)
        return 200, data, headers


def point_hub_at(url: str, token: str | None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Send huggingface_hub (here and in subprocesses) to ``url`` with ``token``; lift offline mode."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    # Derived from ENDPOINT at import; hf_hub_download builds its URLs from it.
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    # Never read the machine's own saved token.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """A running :class:`HubServer` that huggingface_hub talks to (token set in ``HF_TOKEN``)."""
    from huggingface_hub.utils import close_session

    server = HubServer().start()
    point_hub_at(server.url, server.token, monkeypatch, tmp_path)
    try:
        yield server
    finally:
        close_session()  # no pooled connection outlives the server
        server.stop()
