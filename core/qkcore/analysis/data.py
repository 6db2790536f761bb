"""Reading a captured Q/K dataset: local folders or a Hub dataset branch.

The layout (config names, file names, columns) is :mod:`qkcore.layout`'s; the
card's front matter is parsed by :func:`qkcore.card.read_front_matter`. The
card's ``qkcore.models`` entry supplies head counts, the GQA mapping, layer
kinds and windows; without a card the analysis needs ``--num-q-heads`` and
``--num-kv-heads``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from numpy.typing import NDArray

from qkcore.card import card_models, read_front_matter
from qkcore.errors import QkcoreError
from qkcore.layout import CARD_FILE, COLUMNS, config_file, config_name, configs_in, parse_config_name

__all__ = [
    "HeadData",
    "HubSource",
    "LocalSource",
    "ModelMeta",
    "PlasticityError",
    "Source",
    "read_card_models",
    "open_source",
]

Kind = Literal["q", "k"]


class PlasticityError(QkcoreError):
    """A user-facing problem with the input (missing metadata, bad dataset)."""


@dataclass(frozen=True)
class HeadData:
    """Rows of one captured head; ``vectors`` stay float32 to bound memory."""

    bucket: NDArray[np.int64]
    example_id: NDArray[np.int64]
    position: NDArray[np.int64]
    vectors: NDArray[np.float32]
    sliding_window: int | None

    @classmethod
    def from_table(cls, table: pa.Table, name: str) -> HeadData:
        """Convert an Arrow table in the capture schema; ``name`` (the config) is for errors."""
        missing = [c for c in COLUMNS if c != "sliding_window" and c not in table.column_names]
        if missing:
            raise PlasticityError(f"{name}: missing column(s) {', '.join(missing)}")
        cols = {c: table.column(c).combine_chunks() for c in table.column_names}
        vectors = _vectors(cols["vector"], table.num_rows, name)
        window: int | None = None
        if "sliding_window" in cols:
            windows = np.unique(cols["sliding_window"].drop_null().to_numpy(zero_copy_only=False))
            if windows.size > 1:
                raise PlasticityError(f"{name}: mixed sliding_window values {windows.tolist()} in one config")
            window = int(windows[0]) if windows.size else None
        as_i64 = lambda c: cols[c].to_numpy(zero_copy_only=False).astype(np.int64)  # noqa: E731
        return cls(as_i64("bucket"), as_i64("example_id"), as_i64("position"), vectors, window)

    def __len__(self) -> int:
        return int(self.bucket.size)

    @property
    def head_dim(self) -> int:
        """Length of each vector."""
        return int(self.vectors.shape[1])

    def finite_rows(self) -> NDArray[np.bool_]:
        """Mask of the rows whose vector has no NaN or infinity."""
        return np.isfinite(self.vectors).all(axis=1)

    def select(self, rows: NDArray[np.bool_]) -> HeadData:
        """The rows where ``rows`` is true."""
        return HeadData(self.bucket[rows], self.example_id[rows], self.position[rows], self.vectors[rows], self.sliding_window)


def _vectors(col: pa.Array, n: int, name: str) -> NDArray[np.float32]:
    """``n x d`` float32 matrix from a fixed-size (local) or variable (Hub) list column."""
    if col.null_count:
        raise PlasticityError(f"{name}: {col.null_count} row(s) have no vector")
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if n == 0:
        dim = col.type.list_size if pa.types.is_fixed_size_list(col.type) else 0
        return np.zeros((0, dim), dtype=np.float32)
    if not pa.types.is_fixed_size_list(col.type):
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        if lengths.min() != lengths.max():
            raise PlasticityError(f"{name}: vector column has rows of different lengths")
    return flat.reshape(n, flat.size // n)


@dataclass(frozen=True)
class ModelMeta:
    """What the analysis uses from one ``qkcore.models`` card entry.

    ``key_head_of_query`` is ``None`` for cards written before qkcore recorded
    the family's GQA mapping.
    """

    name: str | None = None
    revision: str | None = None
    num_query_heads: int | None = None
    num_key_value_heads: int | None = None
    key_head_of_query: dict[int, dict[int, int]] | None = None
    keys_captured: bool | None = None
    rope_layers: dict[int, bool] = field(default_factory=dict)
    layer_kinds: dict[int, str] = field(default_factory=dict)
    sliding_windows: dict[int, int | None] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_card_entry(cls, entry: dict[str, Any], where: str = "card") -> ModelMeta:
        """Build from a card dict (layer/head keys may be ints or strings in YAML); ``where`` names it in errors."""
        try:
            by_layer = lambda key: {int(k): v for k, v in (entry.get(key) or {}).items()}  # noqa: E731
            as_int = lambda key: int(entry[key]) if entry.get(key) is not None else None  # noqa: E731
            mapping = entry.get("key_head_of_query")
            key_head_of_query = (
                None
                if mapping is None
                else {int(layer): {int(q): int(k) for q, k in heads.items()} for layer, heads in mapping.items()}
            )
            capture = entry.get("capture") or {}
            keys_captured = capture.get("capture_keys")
            return cls(
                name=entry.get("name"),
                revision=entry.get("revision"),
                num_query_heads=as_int("num_query_heads"),
                num_key_value_heads=as_int("num_key_value_heads"),
                key_head_of_query=key_head_of_query,
                keys_captured=None if keys_captured is None else bool(keys_captured),
                rope_layers={k: bool(v) for k, v in by_layer("rope_layers").items()},
                layer_kinds={k: str(v) for k, v in by_layer("layer_kinds").items()},
                sliding_windows={k: (int(v) if v is not None else None) for k, v in by_layer("sliding_windows").items()},
                sampler=dict(entry.get("sampler") or {}),
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise PlasticityError(f"{where}: malformed qkcore.models entry ({exc})") from exc

    def window_for(self, layer: int) -> int | None:
        """Card sliding window of ``layer`` (``None`` for full attention or unknown)."""
        if self.layer_kinds.get(layer, "sliding") != "sliding":
            return None
        return self.sliding_windows.get(layer)


def read_card_models(card: Path | None) -> list[dict[str, Any]]:
    """The ``qkcore.models`` list of the card at ``card`` (``[]`` without a card)."""
    if card is None:
        return []
    try:
        front, _ = read_front_matter(card)
    except ValueError as exc:  # read_front_matter names the file
        raise PlasticityError(str(exc)) from exc
    return card_models(front)


class Source(Protocol):
    """Where captured heads are read from; must be picklable for worker processes."""

    def configs(self) -> list[str]:
        """Names of every captured config (``lXXhYY[qk]``)."""
        ...

    def read(self, layer: int, head: int, kind: Kind) -> HeadData:
        """Load one config listed by :meth:`configs`."""
        ...

    def card(self) -> Path | None:
        """Local path of the dataset card, if there is one."""
        ...

    def describe(self) -> str:
        """Where the data comes from, for the results' README."""
        ...


@dataclass(frozen=True)
class LocalSource:
    """A dataset folder on disk."""

    root: Path

    def configs(self) -> list[str]:
        return configs_in(self.root)

    def read(self, layer: int, head: int, kind: Kind) -> HeadData:
        name = config_name(layer, head, kind)
        path = self.root / config_file(name)
        names = pq.read_schema(path).names
        return HeadData.from_table(pq.read_table(path, columns=[c for c in COLUMNS if c in names]), name)

    def card(self) -> Path | None:
        path = self.root / CARD_FILE
        return path if path.is_file() else None

    def describe(self) -> str:
        # The folder's name, not its absolute path: the README travels (to the Hub, to a paper's supplement)
        # and a machine's paths mean nothing there.
        return f"{self.root.resolve().name} (a local data root)"


@dataclass(frozen=True)
class HubSource:
    """A Hub dataset repository, optionally on a branch (one model per branch)."""

    repo: str
    revision: str | None = None

    def configs(self) -> list[str]:
        # Config names come from the card's ``configs`` list, which the capture keeps in sync.
        from datasets import get_dataset_config_names

        names = get_dataset_config_names(self.repo, revision=self.revision)
        return sorted((n for n in names if parse_config_name(n)), key=lambda n: parse_config_name(n) or (0, 0, ""))

    def read(self, layer: int, head: int, kind: Kind) -> HeadData:
        from datasets import load_dataset

        name = config_name(layer, head, kind)
        ds = load_dataset(self.repo, name, revision=self.revision, split="train")
        table = ds.data.table
        return HeadData.from_table(table.select([c for c in COLUMNS if c in table.column_names]), name)

    def card(self) -> Path | None:
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(self.repo, CARD_FILE, repo_type="dataset", revision=self.revision))
        except Exception:  # noqa: BLE001 - a missing card only drops optional metadata
            return None

    def describe(self) -> str:
        return f"{self.repo}@{self.revision or 'main'} (Hub dataset)"


def open_source(location: str, revision: str | None = None) -> LocalSource | HubSource:
    """A local folder if ``location`` is a directory, else a Hub dataset repo."""
    path = Path(location)
    if path.is_dir():
        return LocalSource(path)
    return HubSource(location, revision)

