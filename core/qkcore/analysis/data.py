"""Reading a captured Q/K dataset: local folders or a Hub dataset branch.

Layout: one config per captured head, ``lXXhYYq`` (query head ``YY`` of layer
``XX``) and ``lXXhYYk`` (key head), each a Parquet table with columns
``bucket``, ``example_id``, ``position``, ``vector`` and ``sliding_window``.
``README.md`` carries YAML front matter whose ``qkcore.models`` list describes
the captured model(s); it is optional metadata here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from numpy.typing import NDArray

__all__ = [
    "HeadData",
    "HubSource",
    "LocalSource",
    "ModelMeta",
    "Source",
    "default_key_head",
    "head_config",
    "card_models",
    "open_source",
    "parse_card",
    "parse_config",
]

Kind = Literal["q", "k"]
_CONFIG_RE = re.compile(r"^l(\d+)h(\d+)([qk])$")
_COLUMNS = ["bucket", "example_id", "position", "vector", "sliding_window"]


def head_config(layer: int, head: int, kind: Kind) -> str:
    """Config/folder name of a captured head, e.g. ``l03h12q``."""
    return f"l{layer:02d}h{head:02d}{kind}"


def default_key_head(query_head: int, num_query_heads: int, num_key_value_heads: int) -> int:
    """GQA mapping ``q_head // (n_q // n_kv)`` (the core's generic default)."""
    if num_key_value_heads <= 0 or num_query_heads % num_key_value_heads:
        raise ValueError(f"{num_query_heads} query heads cannot be grouped over {num_key_value_heads} key/value heads")
    return query_head // (num_query_heads // num_key_value_heads)


@dataclass(frozen=True)
class HeadData:
    """Rows of one captured head; ``vectors`` stay float32 to bound memory."""

    bucket: NDArray[np.int64]
    example_id: NDArray[np.int64]
    position: NDArray[np.int64]
    vectors: NDArray[np.float32]
    sliding_window: int | None

    @classmethod
    def from_table(cls, table: pa.Table) -> HeadData:
        """Convert an Arrow table in the capture schema."""
        cols = {name: table.column(name).combine_chunks() for name in table.column_names}
        vectors = _vectors(cols["vector"], table.num_rows)
        window: int | None = None
        if "sliding_window" in cols:
            valid = cols["sliding_window"].drop_null()
            # A layer has one window; take the first non-null value.
            window = int(valid[0].as_py()) if len(valid) else None
        as_i64 = lambda name: cols[name].to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731
        return cls(as_i64("bucket"), as_i64("example_id"), as_i64("position"), vectors, window)


def _vectors(col: pa.Array, n: int) -> NDArray[np.float32]:
    """``n x d`` float32 matrix from a fixed-size (local) or variable (Hub) list column."""
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if n == 0:
        dim = col.type.list_size if pa.types.is_fixed_size_list(col.type) else 0
        return np.zeros((0, dim), dtype=np.float32)
    if flat.size % n:
        raise ValueError("vector column has rows of different lengths")
    return flat.reshape(n, flat.size // n)


@dataclass(frozen=True)
class ModelMeta:
    """What the analysis uses from one ``qkcore.models`` card entry."""

    num_query_heads: int | None = None
    num_key_value_heads: int | None = None
    rope_layers: dict[int, bool] = field(default_factory=dict)
    layer_kinds: dict[int, str] = field(default_factory=dict)
    sliding_windows: dict[int, int | None] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_card_entry(cls, entry: dict[str, Any]) -> ModelMeta:
        """Build from a card dict; layer keys may be ints or strings in YAML."""
        by_layer = lambda key: {int(k): v for k, v in (entry.get(key) or {}).items()}  # noqa: E731
        as_int = lambda key: int(entry[key]) if entry.get(key) is not None else None  # noqa: E731
        return cls(
            num_query_heads=as_int("num_query_heads"),
            num_key_value_heads=as_int("num_key_value_heads"),
            rope_layers={k: bool(v) for k, v in by_layer("rope_layers").items()},
            layer_kinds={k: str(v) for k, v in by_layer("layer_kinds").items()},
            sliding_windows={k: (int(v) if v is not None else None) for k, v in by_layer("sliding_windows").items()},
            sampler=dict(entry.get("sampler") or {}),
        )

    def window_for(self, layer: int) -> int | None:
        """Card sliding window of ``layer`` (``None`` for full attention or unknown)."""
        if self.layer_kinds.get(layer, "sliding") != "sliding":
            return None
        return self.sliding_windows.get(layer)


def parse_card(text: str | None) -> dict[str, Any]:
    """YAML front matter of a dataset card (``{}`` when there is none)."""
    if not text or not text.startswith("---"):
        return {}
    parts = text.split("\n---", 1)
    if len(parts) < 2:
        return {}
    data = yaml.safe_load(parts[0][3:])
    return data if isinstance(data, dict) else {}


def card_models(front_matter: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``qkcore.models`` list of a parsed card."""
    models = (front_matter.get("qkcore") or {}).get("models") or []
    return [m for m in models if isinstance(m, dict)]


class Source(Protocol):
    """Where captured heads are read from; must be picklable for worker processes."""

    def configs(self) -> list[str]:
        """Names of every captured head config (``lXXhYY[qk]``)."""
        ...

    def read(self, layer: int, head: int, kind: Kind) -> HeadData | None:
        """Load one head, or ``None`` if it was not captured."""
        ...

    def card(self) -> str | None:
        """Text of ``README.md``, if any."""
        ...


@dataclass(frozen=True)
class LocalSource:
    """A dataset folder on disk."""

    root: Path

    def configs(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _CONFIG_RE.match(p.name))

    def read(self, layer: int, head: int, kind: Kind) -> HeadData | None:
        folder = self.root / head_config(layer, head, kind)
        files = [folder / "data.parquet"] if (folder / "data.parquet").is_file() else sorted(folder.glob("*.parquet"))
        if not files:
            return None
        tables = [_read_columns(f) for f in files]
        return HeadData.from_table(pa.concat_tables(tables) if len(tables) > 1 else tables[0])

    def card(self) -> str | None:
        readme = self.root / "README.md"
        return readme.read_text(encoding="utf-8") if readme.is_file() else None


def _read_columns(path: Path) -> pa.Table:
    """Read only the capture columns present in ``path``."""
    names = pq.read_schema(path).names
    return pq.read_table(path, columns=[c for c in _COLUMNS if c in names])


@dataclass(frozen=True)
class HubSource:
    """A Hub dataset repository, optionally on a branch (one model per branch)."""

    repo: str
    revision: str | None = None

    def configs(self) -> list[str]:
        # Config names come from the card's ``configs`` list, which the capture keeps in sync.
        from datasets import get_dataset_config_names

        return sorted(c for c in get_dataset_config_names(self.repo, revision=self.revision) if _CONFIG_RE.match(c))

    def read(self, layer: int, head: int, kind: Kind) -> HeadData | None:
        from datasets import load_dataset

        # Callers check existence against configs(); a config listed there must load.
        ds = load_dataset(self.repo, head_config(layer, head, kind), revision=self.revision, split="train")
        table = ds.data.table
        return HeadData.from_table(table.select([c for c in _COLUMNS if c in table.column_names]))

    def card(self) -> str | None:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(self.repo, "README.md", repo_type="dataset", revision=self.revision)
        except Exception:  # noqa: BLE001 - a missing card only drops optional metadata
            return None
        return Path(path).read_text(encoding="utf-8")


def open_source(location: str, revision: str | None = None) -> LocalSource | HubSource:
    """A local folder if ``location`` is a directory, else a Hub dataset repo."""
    path = Path(location)
    if path.is_dir():
        return LocalSource(path)
    return HubSource(location, revision)


def parse_config(name: str) -> tuple[int, int, Kind] | None:
    """``(layer, head, kind)`` of a config name, or ``None`` if it is not one."""
    m = _CONFIG_RE.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None  # type: ignore[return-value]
