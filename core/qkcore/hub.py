"""Publishing a data root to a Hub dataset repo, one branch per model.

Flow of a sniff with ``output.hf_repo_id``: :meth:`HubSync.pull` the branch's
dataset files into ``data_root`` first (so the card merges what is already
published), write Parquet in place, then :meth:`HubSync.push` every dataset file
in one commit. The token comes from the environment or ``hf auth login`` only.

A marker file guards local data that was written but never pushed: while it
exists, a pull (which would overwrite local files with the branch's) refuses
to run and the user is told to ``qkcore push`` first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from qkcore.errors import QkcoreError
from qkcore.layout import DATA_FILE, config_file, parse_config_name

log = structlog.get_logger(__name__)

PENDING_MARKER = ".qkcore-push-pending"


def dataset_files(data_root: Path, readme: Path) -> list[str]:
    """Repo paths of the files that make up the dataset: the card and every config's Parquet."""
    files = sorted(
        config_file(path.parent.name)
        for path in data_root.glob(f"l*/{DATA_FILE}")
        if parse_config_name(path.parent.name) is not None
    )
    if readme.is_file() and readme.resolve().parent == data_root.resolve():
        files.insert(0, readme.name)
    return files


class HubSync:
    """Pull/push of one data root to ``repo_id`` at ``branch`` through an ``HfApi``."""

    def __init__(self, repo_id: str, branch: str | None, *, private: bool = False, api: Any = None) -> None:
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.branch = branch or "main"
        self.private = private
        self.api = api if api is not None else HfApi()

    def pull(self, data_root: Path) -> None:
        """Fetch the branch's dataset files into ``data_root`` (nothing if repo or branch is new)."""
        marker = data_root / PENDING_MARKER
        if marker.exists():
            raise QkcoreError(
                f"{data_root} holds captured data that was never pushed to {self.repo_id}@{self.branch} "
                f"({marker}); run `qkcore push --config FILE` first, or delete the marker to discard it"
            )
        if not self.api.repo_exists(self.repo_id, repo_type="dataset"):
            log.info("hub repo does not exist yet; nothing to pull", repo=self.repo_id)
            return
        if not self.api.revision_exists(self.repo_id, self.branch, repo_type="dataset"):
            log.info("hub branch does not exist yet; nothing to pull", repo=self.repo_id, branch=self.branch)
            return
        self.api.snapshot_download(
            repo_id=self.repo_id,
            repo_type="dataset",
            revision=self.branch,
            local_dir=str(data_root),
            allow_patterns=["README.md", "l*/data.parquet"],
        )
        log.info("pulled hub branch", repo=self.repo_id, branch=self.branch, data_root=str(data_root))

    def mark_pending(self, data_root: Path) -> None:
        """Record that ``data_root`` has local changes not yet pushed."""
        data_root.mkdir(parents=True, exist_ok=True)
        (data_root / PENDING_MARKER).write_text(f"{self.repo_id}@{self.branch}\n", encoding="utf-8")

    def push(self, data_root: Path, readme: Path, message: str) -> Any:
        """Create repo/branch if missing and upload every dataset file in a single commit."""
        from huggingface_hub import CommitOperationAdd

        files = dataset_files(data_root, readme)
        if not files:
            raise QkcoreError(f"nothing to push: no lXXhYY[qk]/data.parquet under {data_root}")
        try:
            self.api.create_repo(self.repo_id, repo_type="dataset", private=self.private, exist_ok=True)
            if self.branch != "main":
                self.api.create_branch(self.repo_id, repo_type="dataset", branch=self.branch, exist_ok=True)
            operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(data_root / f)) for f in files]
            info = self.api.create_commit(
                self.repo_id,
                operations=operations,
                commit_message=message,
                repo_type="dataset",
                revision=self.branch,
            )
        except Exception as exc:  # network, auth, quota: keep every local file and say how to retry
            raise QkcoreError(
                f"push to {self.repo_id}@{self.branch} failed ({type(exc).__name__}: {exc}); every local file is kept "
                f"in {data_root}; retry the upload alone with `qkcore push --config FILE`"
            ) from exc
        (data_root / PENDING_MARKER).unlink(missing_ok=True)
        log.info("pushed", repo=self.repo_id, branch=self.branch, files=len(files))
        return info


def hub_sync(output_cfg: Any, api: Any = None) -> HubSync | None:
    """The :class:`HubSync` for ``output.*``, or ``None`` when no ``hf_repo_id`` is set."""
    if not output_cfg.hf_repo_id:
        return None
    return HubSync(output_cfg.hf_repo_id, output_cfg.hf_branch, private=output_cfg.private, api=api)
