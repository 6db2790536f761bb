"""The published data layout, in one place: config names, file names, the Arrow schema, ids.

A data root holds one folder per captured (layer, head, kind)::

    lXXhYYq/data.parquet   queries of decoder layer XX, query head YY
    lXXhYYk/data.parquet   keys of decoder layer XX, key/value head YY
    README.md              the dataset card (front matter lists every config)
    qkcore.json            the manifest: the run's identity and each config's rows, buckets and sha256

Every reader and writer of that layout (the writer, the card, the Hub sync,
``inspect``, the analyses) takes names and the schema from here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa

#: File name of each config's data inside its folder.
DATA_FILE = "data.parquet"
#: File name of the dataset card at the data root.
CARD_FILE = "README.md"
#: File name of the run manifest at the data root (identity, per-config statistics and hashes).
MANIFEST_FILE = "qkcore.json"
#: A canonical config name: ``l`` + layer (>= 2 digits) + ``h`` + head (>= 2 digits) + ``q``/``k``.
CONFIG_RE = re.compile(r"^l(\d{2,})h(\d{2,})([qk])$")
#: Column names of a data file, in order.
COLUMNS = ("bucket", "example_id", "position", "vector", "sliding_window")
#: The optional last column: the token at each row (``capture.capture_token_strings``, as in sniff-qk).
TOKEN_COLUMN = "token_str"


def config_name(layer: int, head: int, kind: str) -> str:
    """Return the config name for a (layer, head, kind), e.g. ``l03h07q``."""
    if kind not in ("q", "k"):
        raise ValueError(f"kind must be 'q' or 'k', got {kind!r}")
    if layer < 0 or head < 0:
        raise ValueError(f"layer and head must be non-negative, got {layer}, {head}")
    return f"l{layer:02d}h{head:02d}{kind}"


def parse_config_name(name: str) -> tuple[int, int, str] | None:
    """Parse ``lXXhYY[qk]`` into ``(layer, head, kind)``; ``None`` if not canonical."""
    m = CONFIG_RE.match(name)
    if m is None:
        return None
    layer, head, kind = int(m.group(1)), int(m.group(2)), m.group(3)
    # Reject non-canonical spellings (e.g. "l003h01q") so one config has one name.
    return (layer, head, kind) if config_name(layer, head, kind) == name else None


def configs_in(root: Path) -> list[str]:
    """Config names with a data file under ``root``, sorted by (layer, head, kind) so l100 follows l99."""
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and parse_config_name(p.name) and (p / DATA_FILE).is_file()]
    return sorted(names, key=lambda n: parse_config_name(n) or (0, 0, ""))


def is_dataset_file(path: str) -> bool:
    """Whether repo path ``path`` is part of a published dataset: the card, the manifest, or a config's data."""
    if path in (CARD_FILE, MANIFEST_FILE):
        return True
    folder, _, name = path.partition("/")
    return name == DATA_FILE and parse_config_name(folder) is not None


def config_file(name: str) -> str:
    """Path of a config's data file relative to the data root (``lXXhYYq/data.parquet``)."""
    return f"{name}/{DATA_FILE}"


def output_schema(head_dim: int, token_strings: bool = False) -> pa.Schema:
    """Schema of a final ``data.parquet`` file for vectors of ``head_dim`` (``token_str`` last, if captured)."""
    fields = [
        pa.field("bucket", pa.int32()),
        pa.field("example_id", pa.int32()),
        pa.field("position", pa.int32()),
        pa.field("vector", pa.list_(pa.float32(), head_dim)),
        pa.field("sliding_window", pa.int32()),
    ]
    if token_strings:
        fields.append(pa.field(TOKEN_COLUMN, pa.string()))
    return pa.schema(fields)


def row_bytes(head_dim: int) -> int:
    """Bytes of one row uncompressed: the float32 vector plus 16 bytes of integer columns.

    The same in a final file (four int32 columns) and in the writer's memory (64-bit id,
    position, bucket); the writer's buffers and ``qkcore plan``'s sizes both use it.
    """
    return 4 * head_dim + 16


#: What each column holds, for the card's schema table (``{stage}`` is ``pre`` or ``post``).
COLUMN_MEANINGS = {
    "bucket": "sampler bucket of the token",
    "example_id": "low 32 bits of the normalised 64-bit example id",
    "position": "token position within the example",
    "vector": "the {stage}-RoPE query or key",
    "sliding_window": "the layer's sliding window; null for full attention",
    TOKEN_COLUMN: "the token at this position (capture.capture_token_strings)",
}
#: Columns that may hold nulls.
NULLABLE_COLUMNS = frozenset({"sliding_window"})


def schema_table(token_strings: bool, pre_rope: bool) -> list[tuple[str, str, str]]:
    """``(column, type, meaning)`` for every column of :func:`output_schema`, in order, as the card shows them."""
    import pyarrow.types as pat

    rows = []
    for column in output_schema(0, token_strings):
        kind = column.type
        if pat.is_fixed_size_list(kind):
            words = f"fixed_size_list<{_type_name(kind.value_type)}>[head_dim]"
        else:
            words = _type_name(kind)
        if column.name in NULLABLE_COLUMNS:
            words += ", nullable"
        rows.append((column.name, words, COLUMN_MEANINGS[column.name].format(stage="pre" if pre_rope else "post")))
    return rows


def _type_name(kind: pa.DataType) -> str:
    return {pa.float32(): "float32", pa.string(): "string"}.get(kind, str(kind))


def low32_ids(ids: np.ndarray) -> np.ndarray:
    """The ``example_id`` column: low 32 bits of int64 ids, reinterpreted as signed int32."""
    return (np.asarray(ids, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def low32(example_id: int) -> int:
    """:func:`low32_ids` of one id: the low 32 bits as a signed int32."""
    return ((int(example_id) & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000
