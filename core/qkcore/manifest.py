"""``qkcore.json``, published next to the card: the run's identity and every config's numbers.

The card's front matter stays short (config list, model, settings); the per-config
statistics live here: rows, rows per bucket, non-finite rows, size and sha256 of each
``data.parquet``, and the card's own sha256. A pull from a Hub branch verifies every
file against it, and ``qkcore inspect`` checks the files on disk against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkcore.errors import QkcoreError
from qkcore.layout import CARD_FILE, MANIFEST_FILE, config_file
from qkcore.datafile import ConfigStats
from qkcore.run_state import PublishedFile, RunIdentity

_FORMAT = 1


@dataclass
class Manifest:
    """What one run published: its identity and each config's statistics."""

    identity: RunIdentity
    configs: dict[str, ConfigStats]
    card_sha256: str = ""
    documents: int = 0
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def run_key(self) -> str:
        return self.identity.key

    def published_files(self) -> dict[str, PublishedFile]:
        """Repo path -> file, for every file the manifest vouches for (itself excluded; the card's size is not kept)."""
        files = {CARD_FILE: PublishedFile(None, self.card_sha256)}
        files.update({config_file(name): PublishedFile(s.size, s.sha256) for name, s in self.configs.items()})
        return files

    def to_json(self) -> str:
        configs = {
            name: {
                "rows": s.rows,
                "bucket_counts": {str(b): c for b, c in sorted(s.bucket_counts.items())},
                "nonfinite_rows": s.nonfinite_rows,
                "head_dim": s.head_dim,
                "sliding_window": s.sliding_window,
                "size": s.size,
                "sha256": s.sha256,
            }
            for name, s in sorted(self.configs.items())
        }
        data = {
            "format": _FORMAT,
            "run_key": self.identity.key,
            "identity": dict(self.identity.document),
            "documents": self.documents,
            "tokens": self.tokens,
            "card_sha256": self.card_sha256,
            "configs": configs,
            **({"extra": self.extra} if self.extra else {}),
        }
        # Keys sorted for stable bytes, except bucket numbers: numerically ("2" before "10").
        return json.dumps(_sorted_keys(data), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST_FILE) -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format") != _FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            configs = {
                name: ConfigStats(
                    rows=int(c["rows"]),
                    bucket_counts={int(b): int(n) for b, n in c["bucket_counts"].items()},
                    nonfinite_rows=int(c["nonfinite_rows"]),
                    head_dim=int(c["head_dim"]),
                    sliding_window=c["sliding_window"],
                    size=int(c["size"]),
                    sha256=str(c["sha256"]),
                )
                for name, c in data["configs"].items()
            }
            return cls(
                identity=RunIdentity(str(data["run_key"]), dict(data.get("identity") or {})),
                configs=configs,
                card_sha256=str(data.get("card_sha256") or ""),
                documents=int(data.get("documents") or 0),
                tokens=int(data.get("tokens") or 0),
                extra=dict(data.get("extra") or {}),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QkcoreError(f"{where} is not a qkcore manifest ({exc})") from None


def _sorted_keys(value: Any, parent: str = "") -> Any:
    """``value`` with every mapping's keys sorted, but a ``bucket_counts`` mapping kept in its (numeric) order."""
    if isinstance(value, dict):
        items = value.items() if parent == "bucket_counts" else sorted(value.items())
        return {key: _sorted_keys(child, key) for key, child in items}
    if isinstance(value, list):
        return [_sorted_keys(child) for child in value]
    return value


def read_manifest(path: Path) -> Manifest | None:
    """The manifest at ``path``, ``None`` if there is none; a broken one raises :class:`QkcoreError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return Manifest.from_json(text, str(path))
