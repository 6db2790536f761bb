"""Run identity and completion records: what makes a rerun resume, or do nothing.

The run key hashes every setting that decides which rows are written (dataset,
model, tokenizer, capture, batch size, qkcore version), not where they go or how
they are logged. A finished run leaves a record under ``data_root/.qkcore-runs/``
listing its files with their size and modification time; rerunning the same
config while those files are unchanged does nothing and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from qkcore import __version__
from qkcore.config import SniffConfig, config_to_dict

RUNS_DIR = ".qkcore-runs"


def run_key(cfg: SniffConfig, world_size: int = 1) -> str:
    """A short stable hash of the settings that determine the captured rows."""
    settings = config_to_dict(cfg)
    relevant = {
        "dataset": settings["dataset"],
        "model": settings["model"],
        "tokenizer": settings["tokenizer"],
        "capture": settings["capture"],
        "batch_size": settings["inference"]["batch_size"],
        "world_size": world_size,
        "qkcore": __version__,
    }
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _fingerprint(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def record_completion(data_root: Path, key: str, rows: dict[str, int], summary: dict[str, Any]) -> Path:
    """Write the completion record of run ``key`` (atomically)."""
    files = {name: _fingerprint(data_root / name / "data.parquet") for name in rows}
    record = {"run_key": key, "rows": rows, "files": files, **summary}
    path = data_root / RUNS_DIR / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def completed_run(data_root: Path, key: str) -> dict[str, Any] | None:
    """The record of run ``key`` if it finished and its files are unchanged since, else ``None``."""
    path = data_root / RUNS_DIR / f"{key}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        unchanged = all(
            _fingerprint(data_root / name / "data.parquet") == fingerprint
            for name, fingerprint in record["files"].items()
        )
    except (OSError, ValueError, KeyError):
        return None
    return record if unchanged else None
