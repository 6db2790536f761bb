"""Run identity: everything that decides the rows a run writes, and the key that names it.

Two runs with the same identity write the same rows; a resume, an "already complete",
a Hub pull and a push are allowed only when the identity matches. The identity holds:

* the settings that decide rows (dataset split/columns/limit, model dtype, attention
  implementation and config overrides, tokenizer max length, every capture setting, the
  batch size, the device type, autocast where it applies);
* fingerprints of what was actually read: the documents (a local file's or folder's
  content hash, a Hub dataset's resolved commit), the model weights and the tokenizer
  (resolved commit, file hashes, or the random-init recipe);
* :data:`ROW_RULES_VERSION`, the version of qkcore's row-deciding rules (sampling, ids,
  buckets, sorting): bumped when one of them changes, not with every release.

Paths are not part of it: moving a corpus or a checkpoint does not change a run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from qkcore.config import SniffConfig, config_to_dict
from qkcore.errors import QkcoreError
from qkcore.fsutil import sha256_file

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
    if device_type == "cuda":  # autocast applies only there
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


def run_key(identity: dict[str, Any]) -> str:
    """A short stable hash naming a run identity (16 hex digits)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def describe_difference(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    """Name the parts of two identities that differ, e.g. ``dataset.documents.sha256 (3f2a.. -> 9c01..)``.

    ``before`` may be ``None`` (a record from before identities were kept).
    """
    if not isinstance(before, dict):
        return "the earlier run recorded no identity"
    changes: list[str] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
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


def dataset_fingerprint(dataset_cfg: Any, *, timeout_s: float = 30.0) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- model and tokenizer

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "vocab.txt", "merges.txt", "tokenizer.model", "added_tokens.json", "spiece.model")


def model_fingerprint(model_cfg: Any, config: Any) -> dict[str, Any]:
    """What identifies the weights: the random-init recipe, local file hashes, or a Hub commit."""
    if model_cfg.config is not None:
        import torch

        spec = json.dumps(config.to_dict(), sort_keys=True, default=str)
        return {
            "source": "random",
            "config_sha256": hashlib.sha256(spec.encode("utf-8")).hexdigest(),
            "init_seed": model_cfg.init_seed,
            "torch": str(torch.__version__),
        }
    local = Path(os.path.expanduser(model_cfg.name))
    if local.is_dir():
        files = {p.name: sha256_file(p) for p in sorted(local.iterdir()) if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"}
        return {"source": "local", "files": files}
    return {"source": "hub", "repo": model_cfg.name, "commit": _hub_commit(model_cfg.name, model_cfg.revision, "config.json", "model.name")}


def tokenizer_fingerprint(tokenizer_cfg: Any, model_cfg: Any) -> dict[str, Any]:
    """What identifies the tokenizer: the built-in byte tokenizer, local file hashes, or a Hub commit."""
    from qkcore.sources.tokenizer import BYTE_TOKENIZER

    name = tokenizer_cfg.name or model_cfg.name
    if name == BYTE_TOKENIZER:
        return {"source": "builtin", "name": BYTE_TOKENIZER, "version": 1}
    local = Path(os.path.expanduser(name))
    if local.is_dir():
        return {"source": "local", "files": {f: sha256_file(local / f) for f in _TOKENIZER_FILES if (local / f).is_file()}}
    return {"source": "hub", "repo": name, "commit": _hub_commit(name, tokenizer_cfg.revision, "tokenizer_config.json", "tokenizer.name")}


def _hub_commit(repo_id: str, revision: str | None, filename: str, key: str) -> str:
    """The commit of ``repo_id@revision`` that a file was (or would be) loaded from: the snapshot folder's name."""
    from transformers.utils.hub import cached_file

    try:
        path = cached_file(repo_id, filename, revision=revision)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types here
        raise QkcoreError(f"{key}: cannot resolve the revision of '{repo_id}' ({type(exc).__name__}: {exc})") from None
    snapshot = Path(path).parent
    if snapshot.parent.name != "snapshots":
        raise QkcoreError(f"{key}: cannot tell which commit of '{repo_id}' was loaded ({path}); pin model.revision")
    return snapshot.name
