"""Run identity: everything that decides the rows a run writes, and the key that names it.

Two runs with the same identity write the same rows; a resume, an "already complete",
a Hub pull and a push are allowed only when the identity matches. The identity holds:

* the settings that decide rows (dataset split/columns/limit, model dtype, attention
  implementation and config overrides, tokenizer max length, every capture setting, the
  batch size, the device type, autocast where it applies);
* fingerprints of what was actually read: the documents (:func:`dataset_fingerprint`:
  a local file's or folder's content hash, a Hub dataset's resolved commit), the weights
  and the tokenizer (``qkcore.sources.model.model_identity`` and
  ``qkcore.sources.tokenizer.tokenizer_identity``: a resolved commit, file hashes, or the
  random-init recipe);
* :data:`ROW_RULES_VERSION`, the version of qkcore's row-deciding rules (sampling, ids,
  buckets, sorting): bumped when one of them changes, not with every release.

Paths are not part of it: moving a corpus or a checkpoint does not change a run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from qkcore.autocast import autocast_applies
from qkcore.config import DatasetConfig, SniffConfig, config_to_dict
from qkcore.errors import QkcoreError
from qkcore.fsutil import sha256_file
from qkcore.run_state import RunIdentity

#: Version of the rules that decide which rows are written and how (see the module docstring).
ROW_RULES_VERSION = 1

_DATASET_SETTINGS = ("name", "split", "text_column", "id_column", "max_samples")
_MODEL_SETTINGS = ("dtype", "attn_implementation", "config_overrides")
_TOKENIZER_SETTINGS = ("max_length",)


def run_identity(
    cfg: SniffConfig, *, dataset: dict[str, Any], model: dict[str, Any], tokenizer: dict[str, Any], device_type: str
) -> dict[str, Any]:
    """The identity of the run ``cfg`` describes, given the fingerprints of its inputs."""
    settings = config_to_dict(cfg)
    inference: dict[str, Any] = {"batch_size": settings["inference"]["batch_size"]}
    if settings["inference"].get("tensor_parallel_size", 1) > 1:  # issue 19; absent at 1: earlier run keys stand
        inference["tensor_parallel_size"] = settings["inference"]["tensor_parallel_size"]
    if autocast_applies(device_type):
        inference["autocast_dtype"] = settings["inference"]["autocast_dtype"]
    return {
        "rules": ROW_RULES_VERSION,
        "dataset": {**{k: settings["dataset"][k] for k in _DATASET_SETTINGS}, "documents": dataset},
        "model": {**{k: settings["model"][k] for k in _MODEL_SETTINGS}, "weights": model},
        "tokenizer": {**{k: settings["tokenizer"][k] for k in _TOKENIZER_SETTINGS}, "files": tokenizer},
        "capture": settings["capture"],
        "inference": inference,
        "device": device_type,
    }


def run_key(identity: Mapping[str, Any]) -> str:
    """A short stable hash naming a run identity (16 hex digits; :meth:`RunIdentity.of`)."""
    return RunIdentity.of(identity).key


def describe_difference(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> str:
    """Name the parts of two identities that differ, e.g. ``dataset.documents.sha256 (3f2a.. -> 9c01..)``.

    ``before`` may be ``None`` (a record from before identities were kept).
    """
    if not isinstance(before, Mapping):
        return "the earlier run recorded no identity"
    changes: list[str] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for key in sorted(set(a) | set(b)):
                walk(f"{path}.{key}" if path else str(key), a.get(key), b.get(key))
        elif a != b:
            changes.append(f"{path} ({_short(a)} -> {_short(b)})")

    walk("", before, after)
    if not changes:
        return "nothing differs"
    more = f" and {len(changes) - 4} more" if len(changes) > 4 else ""
    return "; ".join(changes[:4]) + more


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + ".."  # a sha256
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- documents


def dataset_fingerprint(dataset_cfg: DatasetConfig, *, timeout_s: float = 30.0) -> dict[str, Any]:
    """What identifies the documents of ``dataset.path``, read now.

    A local file: its size and sha256. A local folder (``save_to_disk`` or data files):
    every file's sha256. A Hub dataset: its id and resolved commit. A revision that
    cannot be resolved is an error: the identity is never guessed.
    """
    path = Path(dataset_cfg.path)
    if path.is_file():
        return {"source": "file", "name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}
    if path.is_dir():
        return {"source": "folder", "files": _folder_hashes(path)}
    return {"source": "hub", "repo": dataset_cfg.path, "commit": hub_dataset_commit(dataset_cfg.path, timeout_s)}


def _folder_hashes(root: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            files[path.relative_to(root).as_posix()] = sha256_file(path)
    return files


def hub_dataset_commit(repo_id: str, timeout_s: float = 30.0) -> str:
    """The commit a Hub dataset's default branch resolves to (from the Hub, or the local cache offline)."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            sha = HfApi().dataset_info(repo_id, timeout=timeout_s).sha
        except Exception as exc:  # network, auth, missing repo: say which
            raise QkcoreError(
                f"dataset.path: cannot resolve the revision of Hub dataset '{repo_id}' "
                f"({type(exc).__name__}: {exc}); check the id and your connection"
            ) from None
        if sha:
            return str(sha)
    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text(encoding="utf-8").strip()
    except OSError:
        raise QkcoreError(
            f"dataset.path: cannot resolve the revision of Hub dataset '{repo_id}': offline, and no cached "
            f"revision at {ref}; run once online, or use a local copy of the dataset"
        ) from None
