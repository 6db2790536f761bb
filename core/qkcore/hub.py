"""Publishing a data root to a Hub dataset repo: one branch per model, mirroring the root.

A data root holds one run (one model's capture). Its branch, ``output.hf_repo_id`` @
``output.hf_branch`` (``main`` when unset), holds exactly the root's dataset files (the card
``README.md``, the manifest ``qkcore.json`` and every ``lXXhYY[qk]/data.parquet``, see
:func:`qkcore.layout.is_dataset_file`), plus the ``.gitattributes`` the Hub keeps for LFS
(``upload_folder`` never deletes it either). Which files, and whether to pull or push at
all, the run decides (``sniff.py``, ``root_policy.py``); this module moves them.

* :meth:`HubSync.preflight` runs before any model loads: offline mode, token (whoami; a
  read-only token or a namespace the token cannot create in is refused), whether repo and
  branch exist, the branch's head commit, its files with their digests, and its card.
* :meth:`HubSync.download` fetches named files of that head commit; each is checked against
  the digest the branch records for it and renamed into place only when complete.
* :meth:`HubSync.push` creates repo and branch if missing, makes the branch hold exactly the
  given files in one commit (files not among them are deleted), checks the commit's tree
  against the local files' digests, then updates the index of run branches in ``main``'s
  README (:mod:`qkcore.hub_index`: one commit touching only that file).

Failures: every request is bounded by ``timeout_s``; transient failures (HTTP 5xx and 429,
timeouts, connection errors) retry the whole step at most ``retries`` times with exponential
backoff (tenacity); anything else is not retried. The last failure becomes one
:class:`QkcoreError` line naming ``repo@branch``, the step and the cause.

How requests are bounded: huggingface_hub sends every request through one shared httpx2
client, and several ``HfApi`` methods pass ``timeout=None`` (no limit) to it, while others
retry internally with their own backoff (``http_backoff``) and some do not. Through
huggingface_hub's public ``set_client_factory``, qkcore makes that shared client a
:class:`_HubClient` (once, carrying the request hooks of the client it replaces: the offline
check and request ids). Outside a HubSync step it behaves as huggingface_hub's default
client; while a step runs it writes the step's time limit into every request and raises
transient failures at once as :class:`_Transient`, so the only retry policy is HubSync's,
applied to whole steps. Steps run one at a time (before the model loads, or after the
capture).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import quote

import httpx2
import structlog
import tenacity
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, RepoFile
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils import build_hf_headers, get_session, get_token, hf_raise_for_status, set_client_factory

from qkcore import __version__
from qkcore.errors import QkcoreError
from qkcore.fsutil import write_durably
from qkcore.hub_index import IndexEntry, update_index
from qkcore.layout import CARD_FILE, COLUMNS, is_dataset_file

if TYPE_CHECKING:  # pragma: no cover - typing only
    from qkcore.config import OutputConfig

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: The Hub's LFS settings file: kept on a branch by a push, like ``upload_folder`` keeps it.
GITATTRIBUTES = ".gitattributes"
#: The longest wait between two attempts, whatever the backoff or a ``Retry-After`` asks.
MAX_WAIT_S = 60.0
#: Files downloaded at once.
DOWNLOAD_WORKERS = 8
_CHUNK = 1 << 20
_NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login`"
_OFFLINE = "the Hub cannot be reached: offline mode is on (HF_HUB_OFFLINE=1)"


@dataclass(frozen=True)
class RemoteFile:
    """What a branch records about one file: enough to check a download byte for byte."""

    size: int
    blob_id: str  # git object id (for an LFS file: of its pointer)
    sha256: str | None = None  # sha256 of the content, for LFS files


@dataclass(frozen=True)
class BranchState:
    """A branch as :meth:`HubSync.preflight` saw it."""

    repo_exists: bool
    branch_exists: bool
    commit: str | None  # head commit of the branch; None when it does not exist
    files: tuple[str, ...]  # every file on the branch (repo paths), sorted
    card: str | None  # README.md text on the branch, if any
    #: Size and digests of each file, which :meth:`HubSync.download` checks against.
    remote: Mapping[str, RemoteFile] = field(default_factory=dict, compare=False, repr=False)


def main_branch_readme(repo_id: str) -> str:
    """The README a new repo's ``main`` gets: what each model's branch holds and how to load it."""
    columns = ", ".join(f"`{name}`" for name in COLUMNS)
    return f"""# {repo_id}

Query and key vectors captured with qkcore from transformer language models during
long-context inference, sampled by position.

This `main` branch holds no data. **Every captured model has a branch of its own** (the
`output.hf_branch` of its run), and each branch is a complete dataset with its own card.

## What a model's branch holds

- `README.md`: the card of that capture (model, source documents, sampler, heads, one config per head)
- `lXXhYYq/data.parquet`: query vectors of decoder layer `XX`, query head `YY`
- `lXXhYYk/data.parquet`: key vectors of decoder layer `XX`, key/value head `YY`

Each file has the columns {columns}. The card says whether vectors were taken after RoPE
(the default) or before it.

## Loading one head of one model

```python
from datasets import load_dataset

branch = "..."  # the model's branch
queries = load_dataset("{repo_id}", "l00h00q", revision=branch, split="train")
keys = load_dataset("{repo_id}", "l00h00k", revision=branch, split="train")
```

The branches are listed by `huggingface_hub.list_repo_refs("{repo_id}", repo_type="dataset")`.
"""


class _Transient(Exception):
    """A failure worth another attempt: an HTTP 5xx or 429 answer, a timeout, a broken connection."""

    def __init__(self, cause: str, retry_after: float | None = None) -> None:
        super().__init__(cause)
        self.retry_after = retry_after


class _Mismatch(Exception):
    """Downloaded or committed bytes differ from what they should be (not retried)."""


class _HubClient(httpx2.Client):
    """huggingface_hub's shared client; during a HubSync step, requests are bounded and transient failures raised.

    Outside a step (:func:`_hub_client`) it is huggingface_hub's default client: the same
    request hooks, redirects followed, no time limit. During one, the step's limit is written
    into each request (connect, write, each read, pool), where a caller's ``timeout=None``
    cannot lift it, and a transient failure is raised as :class:`_Transient`, which is neither
    an httpx2 error nor a response, so huggingface_hub's inner backoff does not retry it:
    HubSync's retry is the only one.
    """

    def __init__(self, request_hooks: Sequence[Callable[..., Any]]) -> None:
        super().__init__(event_hooks={"request": list(request_hooks)}, follow_redirects=True, timeout=None)

    def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
        limit = _STEP_LIMIT_S[0]
        if limit is None:  # not inside a HubSync step
            return super().send(request, **kwargs)
        asked = request.extensions.get("timeout") or {}
        request.extensions = {
            **request.extensions,
            "timeout": {
                key: limit if asked.get(key) is None else min(asked[key], limit)
                for key in ("connect", "read", "write", "pool")
            },
        }
        origin = f"{request.url.scheme}://{request.url.netloc.decode()}"
        try:
            response = super().send(request, **kwargs)
        except httpx2.ConnectTimeout as exc:
            raise _Transient(f"the Hub cannot be reached at {origin} (no connection within {limit:g} s)") from exc
        except httpx2.TimeoutException as exc:
            raise _Transient(f"timed out after {limit:g} s ({request.method} {request.url.path})") from exc
        except httpx2.ConnectError as exc:
            raise _Transient(f"the Hub cannot be reached at {origin} ({_one_line(exc)})") from exc
        except (httpx2.NetworkError, httpx2.RemoteProtocolError) as exc:
            raise _Transient(f"the connection to {origin} broke ({_one_line(exc)})") from exc
        if response.status_code == 429 or response.status_code >= 500:
            response.read()
            response.close()
            raise _Transient(_status_text(response), retry_after=_retry_after(response))
        return response


#: The running HubSync step's time limit (``[None]`` outside a step); steps run one at a time.
_STEP_LIMIT_S: list[float | None] = [None]


@contextlib.contextmanager
def _hub_client(timeout_s: float) -> Iterator[None]:
    """Bound huggingface_hub's requests by ``timeout_s`` (and raise transient failures) while the block runs.

    The first call makes huggingface_hub's shared client a :class:`_HubClient` through its
    public ``set_client_factory``, keeping the request hooks (offline check, request ids) of
    the client it replaces, read from the public ``get_session()``.
    """
    session = get_session()
    if not isinstance(session, _HubClient):
        hooks = tuple(session.event_hooks.get("request", ()))
        set_client_factory(lambda: _HubClient(hooks))
    previous, _STEP_LIMIT_S[0] = _STEP_LIMIT_S[0], timeout_s
    try:
        yield
    finally:
        _STEP_LIMIT_S[0] = previous


class HubSync:
    """Preflight, download and push of one data root to ``repo_id`` at ``branch``.

    ``api`` is the ``HfApi`` to use (its ``endpoint`` and ``token``); by default ``HfApi()``,
    which takes both from the environment (``HF_ENDPOINT``, ``HF_TOKEN`` or ``hf auth login``).
    """

    def __init__(
        self,
        repo_id: str,
        branch: str | None,
        *,
        private: bool = False,
        api: Any = None,
        timeout_s: float = 60.0,
        retries: int = 5,
        backoff_s: float = 1.0,
    ) -> None:
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(f"need timeout_s > 0, retries >= 0, backoff_s >= 0; got {timeout_s}, {retries}, {backoff_s}")
        self.repo_id = repo_id
        self.branch = branch or "main"
        self.private = private
        self.api = api if api is not None else HfApi()
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    @property
    def where(self) -> str:
        """``repo@branch``, as every message names it."""
        return f"{self.repo_id}@{self.branch}"

    # -- the three steps ---------------------------------------------------------------------------

    def preflight(self) -> BranchState:
        """Check token and access, and describe the branch (its card is the only file downloaded)."""
        try:
            with _hub_client(self.timeout_s):
                user = self._retry(self.api.whoami, token=self._token())
                self._check_user(user)
                try:
                    refs = self._retry(self.api.list_repo_refs, self.repo_id, repo_type="dataset")
                except RepositoryNotFoundError:
                    self._check_can_create(user)
                    return BranchState(False, False, None, (), None)
                commit = next((ref.target_commit for ref in refs.branches if ref.name == self.branch), None)
                if commit is None:
                    return BranchState(True, False, None, (), None)
                remote = self._retry(self._tree, commit)
                card = None
                if CARD_FILE in remote:
                    buffer = self._retry(self._fetch_to_buffer, commit, CARD_FILE, remote[CARD_FILE])
                    card = buffer.decode("utf-8")
        except QkcoreError:
            raise
        except Exception as exc:
            raise QkcoreError(f"hub {self.where}: preflight failed: {self._cause(exc)}") from exc
        log.info("hub branch checked", repo=self.repo_id, branch=self.branch, commit=commit, files=len(remote))
        return BranchState(True, True, commit, tuple(sorted(remote)), card, remote)

    def download(self, state: BranchState, files: Sequence[str], target: Path) -> None:
        """Fetch ``files`` of the commit ``state`` saw into ``target`` (repo paths become relative paths).

        Each file is checked against the size and digest the branch records, written to a hidden
        temp file beside its final name (``.NAME.tmp``, as the writer does) and renamed into place
        when complete: a kill never leaves a half file under its final name, and a failure leaves
        no other file in ``target`` (a kill can leave only such a hidden temp file).
        """
        files = list(dict.fromkeys(files))
        if not files:
            return
        if state.commit is None:
            raise QkcoreError(f"hub {self.where}: nothing to download: the branch does not exist")
        unknown = [f for f in files if f not in state.files]
        if unknown:
            raise QkcoreError(f"hub {self.where}: not on the branch at {state.commit[:12]}: {', '.join(unknown[:5])}")
        unsafe = [f for f in files if PurePosixPath(f).is_absolute() or ".." in PurePosixPath(f).parts]
        if unsafe:
            raise QkcoreError(f"hub {self.where}: refusing to download paths outside the data root: {unsafe[:5]}")
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        failures: list[tuple[str | None, BaseException]] = []
        try:
            with _hub_client(self.timeout_s), ThreadPoolExecutor(DOWNLOAD_WORKERS, "qkcore-hub") as pool:
                futures = [
                    (f, pool.submit(self._retry, self._download_one, state.commit, f, state.remote.get(f), target))
                    for f in files
                ]
                _, pending = wait([future for _, future in futures], return_when=FIRST_EXCEPTION)
                for future in pending:  # after one failure, start no more files
                    future.cancel()
                failures = [(f, fut.exception()) for f, fut in futures if not fut.cancelled() and fut.exception()]
        except Exception as exc:  # a failure outside any one file (e.g. no thread could start)
            failures = [(None, exc)]
        if failures:
            failed, error = failures[0]
            what = f"download of {failed}" if failed else "download"
            raise QkcoreError(
                f"hub {self.where}: {what} failed: {self._cause(error)}; no file in {target} is half-written"
            ) from error
        log.info("downloaded hub branch", repo=self.repo_id, branch=self.branch, commit=state.commit,
                 files=len(files), target=str(target))

    def push(self, data_root: Path, files: Sequence[str], message: str) -> str:
        """Make the branch hold exactly ``files`` of ``data_root`` in one commit; return its id.

        Creates repo and branch if missing; afterwards ``main``'s README lists the branch
        (:func:`qkcore.hub_index.update_index`). Never changes a local file: after any failure
        everything is still in ``data_root``.
        """
        data_root = Path(data_root)
        files = list(dict.fromkeys(files))
        self._check_local(data_root, files)
        try:
            with _hub_client(self.timeout_s):
                token = self._token()
                self._retry(self.api.create_repo, self.repo_id, repo_type="dataset", private=self.private,
                            exist_ok=True, token=token)
                if self.branch != "main":
                    self._retry(self.api.create_branch, self.repo_id, repo_type="dataset", branch=self.branch,
                                exist_ok=True, token=token)
                commit = self._retry(self._commit, data_root, files, message)
                self._verify(commit, data_root, files)
                if self.branch != "main":  # main's README lists every run branch (hub_index.py)
                    card = data_root / CARD_FILE
                    entry = IndexEntry.from_card(self.branch, card.read_text(encoding="utf-8") if card.is_file() else None)
                    self._retry(update_index, self.api, self.repo_id, entry)
        except Exception as exc:
            raise QkcoreError(
                f"hub {self.where}: push failed: {self._cause(exc)}; every local file is kept in {data_root}; "
                "retry the upload alone with `qkcore push --config FILE`"
            ) from exc
        log.info("pushed", repo=self.repo_id, branch=self.branch, commit=commit, files=len(files))
        return commit

    # -- parts ---------------------------------------------------------------------------------------

    def _retry(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, retried on :class:`_Transient` at most ``retries`` times."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_Transient),
            stop=tenacity.stop_after_attempt(self.retries + 1),
            wait=self._wait,
            before_sleep=self._log_retry,
            reraise=True,
        )
        return retrying(fn, *args, **kwargs)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """Exponential backoff from ``backoff_s``; longer if the server asked for it (``Retry-After``)."""
        backoff = self.backoff_s * 2 ** (state.attempt_number - 1)
        asked = getattr(state.outcome.exception(), "retry_after", None) if state.outcome else None
        return min(max(backoff, asked or 0.0), MAX_WAIT_S)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("hub request failed; retrying", where=self.where, attempt=state.attempt_number,
                    of=self.retries + 1, cause=str(error),
                    wait_s=round(state.next_action.sleep, 2) if state.next_action else None)

    def _token(self) -> str:
        """The token to use: the ``api``'s own, else ``HF_TOKEN`` or the one ``hf auth login`` saved."""
        if hf_constants.is_offline_mode():
            raise OfflineModeIsEnabled(_OFFLINE)
        token = self.api.token if isinstance(getattr(self.api, "token", None), str) else get_token()
        if not token:
            raise LocalTokenNotFoundError(_NO_TOKEN)
        return token

    def _check_user(self, user: Mapping[str, Any]) -> None:
        role = ((user.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise QkcoreError(
                f"hub {self.where}: the token of {user.get('name')} is read-only; pushing needs a token with write "
                "access (set HF_TOKEN or run `hf auth login`)"
            )

    def _check_can_create(self, user: Mapping[str, Any]) -> None:
        """A missing repo must be creatable: its namespace is the token's user or one of their orgs."""
        namespace = self.repo_id.split("/")[0] if "/" in self.repo_id else user.get("name")
        allowed = {user.get("name"), *((org or {}).get("name") for org in user.get("orgs") or [])}
        if namespace not in allowed:
            raise QkcoreError(
                f"hub {self.where}: the repo does not exist (or is not visible to {user.get('name')}), and "
                f"{user.get('name')} cannot create it: '{namespace}' is neither the user nor one of their organisations"
            )

    def _check_local(self, data_root: Path, files: list[str]) -> None:
        """Refuse before any request: non-dataset paths, missing files, or no config at all."""
        foreign = [f for f in files if not is_dataset_file(f)]
        if foreign:
            raise QkcoreError(f"hub {self.where}: not dataset files (README.md, qkcore.json, lXXhYY[qk]/data.parquet): {foreign[:5]}")
        missing = [f for f in files if not (data_root / f).is_file()]
        if missing:
            raise QkcoreError(f"hub {self.where}: missing under {data_root}: {', '.join(missing[:5])}")
        if not any(f != CARD_FILE for f in files):
            raise QkcoreError(f"hub {self.where}: nothing to push: no lXXhYY[qk]/data.parquet under {data_root}")

    def _tree(self, revision: str) -> dict[str, RemoteFile]:
        """Every file at ``revision`` with its size and digests."""
        entries = self.api.list_repo_tree(self.repo_id, revision=revision, recursive=True, repo_type="dataset")
        return {
            entry.path: RemoteFile(entry.size, entry.blob_id, entry.lfs.sha256 if entry.lfs else None)
            for entry in entries
            if isinstance(entry, RepoFile)
        }

    def _commit(self, data_root: Path, files: list[str], message: str) -> str:
        """One commit on the branch: add/update ``files``, delete every other file but ``.gitattributes``.

        The branch is read and the operations built afresh on each attempt (a retried commit
        that had in fact landed then finds nothing to change); ``parent_commit`` makes a commit
        that raced another writer fail instead of mixing the two.
        """
        refs = self.api.list_repo_refs(self.repo_id, repo_type="dataset")
        head = next((ref.target_commit for ref in refs.branches if ref.name == self.branch), None)
        if head is None:
            raise _Mismatch(f"branch {self.branch} vanished after it was created")
        keep = {*files, GITATTRIBUTES}
        operations: list[Any] = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(data_root / f)) for f in files]
        operations += [CommitOperationDelete(path_in_repo=path) for path in self._tree(head) if path not in keep]
        info = self.api.create_commit(self.repo_id, operations=operations, commit_message=message,
                                      repo_type="dataset", revision=self.branch, parent_commit=head)
        return info.oid

    def _verify(self, commit: str, data_root: Path, files: list[str]) -> None:
        """The commit's tree is exactly ``files`` (and ``.gitattributes``), each byte for byte as in ``data_root``.

        huggingface_hub's own check: sha256 for LFS files, the git blob id for the others.
        """
        check = self._retry(self.api.verify_repo_checksums, self.repo_id, repo_type="dataset", revision=commit,
                            local_dir=data_root)
        differ = sorted(m["path"] for m in check.mismatches)
        foreign = sorted(set(check.missing_paths) - {GITATTRIBUTES})  # on the branch, not in the root
        absent = sorted(set(files) & set(check.extra_paths))  # pushed, yet not on the branch
        if differ or foreign or absent:
            raise _Mismatch(
                f"commit {commit[:12]} does not mirror the root: differing {differ[:5]}, "
                f"not in the root {foreign[:5]}, missing {absent[:5]}"
            )

    def _download_one(self, commit: str, path: str, expected: RemoteFile | None, target: Path) -> None:
        final = target / path
        created = [p for p in (final.parent, *final.parent.parents) if p != target and p.is_relative_to(target)
                   and not p.exists()]
        final.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as out:
                self._fetch(commit, path, expected, out)

        try:
            write_durably(final, write)
        except BaseException:
            for folder in created:  # leave no empty folder behind either
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise

    def _fetch_to_buffer(self, commit: str, path: str, expected: RemoteFile | None) -> bytes:
        buffer = io.BytesIO()
        self._fetch(commit, path, expected, buffer)
        return buffer.getvalue()

    def _fetch(self, commit: str, path: str, expected: RemoteFile | None, out: BinaryIO) -> None:
        """Stream ``path`` at ``commit`` into ``out``, checking size and digest against ``expected``."""
        url = f"{self.api.endpoint.rstrip('/')}/datasets/{self.repo_id}/resolve/{commit}/{quote(path)}"
        headers = build_hf_headers(token=self._token(), library_name="qkcore", library_version=__version__)
        digest = _Digest(expected) if expected is not None else None
        try:
            with get_session().stream("GET", url, headers=headers) as response:
                hf_raise_for_status(response)
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    if digest is not None:
                        digest.update(chunk)
        except httpx2.TimeoutException as exc:  # while reading the body, past _HubClient.send
            raise _Transient(f"timed out after {self.timeout_s:g} s reading {path}") from exc
        except (httpx2.NetworkError, httpx2.RemoteProtocolError) as exc:
            raise _Transient(f"connection lost reading {path} ({_one_line(exc)})") from exc
        if digest is not None and not digest.matches():
            recorded = f"sha256 {expected.sha256[:12]}" if expected.sha256 else f"blob {expected.blob_id[:12]}"
            raise _Mismatch(f"{path} as downloaded ({digest.size} bytes) does not match what commit {commit[:12]} "
                            f"records ({expected.size} bytes, {recorded})")

    def _cause(self, exc: BaseException) -> str:
        """One line saying why a step failed."""
        if isinstance(exc, _Transient):
            return f"{exc} (gave up after {self.retries + 1} attempts)"
        if isinstance(exc, _Mismatch):
            return str(exc)
        if isinstance(exc, OfflineModeIsEnabled):
            return _OFFLINE
        if isinstance(exc, LocalTokenNotFoundError):
            return _NO_TOKEN
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            status = exc.response.status_code
            if status == 401:
                source = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "the saved token (`hf auth login`)"
                return f"401 unauthorised: the Hub refused {source}; set a valid HF_TOKEN or run `hf auth login`"
            if status == 403:
                return f"403 forbidden: the token may not write to {self.repo_id} ({_server_message(exc)})"
            if isinstance(exc, RepositoryNotFoundError):
                return f"{status} repository {self.repo_id} not found"
            return f"HTTP {status} ({_server_message(exc)})"
        return f"{type(exc).__name__}: {_one_line(exc)}"


def hub_sync(output_cfg: OutputConfig, api: Any = None) -> HubSync | None:
    """The :class:`HubSync` for ``output.*``, or ``None`` when no ``hf_repo_id`` is set."""
    if not output_cfg.hf_repo_id:
        return None
    return HubSync(
        output_cfg.hf_repo_id,
        output_cfg.hf_branch,
        private=output_cfg.private,
        api=api,
        timeout_s=output_cfg.hub_timeout_s,
        retries=output_cfg.hub_retries,
    )


class _Digest:
    """Running digest of downloaded bytes, of the kind the branch records for the file.

    As huggingface_hub's ``verify_repo_checksums``: sha256 of the content for LFS files, the
    git blob id (sha1 over ``blob <size>\\0`` + content) for the others.
    """

    def __init__(self, expected: RemoteFile) -> None:
        self.expected = expected
        self.size = 0
        self._hash = hashlib.sha256() if expected.sha256 else hashlib.sha1(b"blob %d\0" % expected.size)

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._hash.update(chunk)

    def matches(self) -> bool:
        return self.size == self.expected.size and self._hash.hexdigest() == (self.expected.sha256 or self.expected.blob_id)


def _one_line(value: object, limit: int = 300) -> str:
    text = " ".join(str(value).split()) or type(value).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _server_message(exc: HfHubHTTPError) -> str:
    return _one_line(exc.server_message or exc.response.reason_phrase or exc)


def _status_text(response: httpx2.Response) -> str:
    message = response.headers.get("X-Error-Message")
    if message is None:
        with contextlib.suppress(ValueError, AttributeError):
            message = response.json().get("error")
    text = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    return f"{text} ({_one_line(message, 200)})" if message else text


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None
