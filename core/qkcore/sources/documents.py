"""Reading documents: a hub dataset or local jsonl/json/parquet/csv/txt files or a ``save_to_disk`` folder.

Every document is checked before it is captured, and a bad one stops the run with
one message naming the row (0-based dataset index) and its id: a text that is null
or not a string, and an example id that two rows share (downstream analyses tell
documents apart by id, so two texts under one id would be mixed silently). Empty
texts have no tokens: they are skipped, counted, and the count goes into the card.
For an in-memory dataset :func:`check_documents` does all of this from the Arrow
columns before any model is loaded; a streaming dataset is checked row by row as
it is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from qkcore.errors import QkcoreError
from qkcore.example_ids import normalize_example_id

if TYPE_CHECKING:  # pragma: no cover - typing only
    from qkcore.config import DatasetConfig

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass(frozen=True)
class Document:
    """One text to capture, with its normalised 64-bit example id and its index in the dataset."""

    example_id: int
    text: str
    index: int = 0


@dataclass(frozen=True)
class DocumentCheck:
    """What :func:`check_documents` found: how many documents a run reads, how many are empty."""

    documents: int | None  # None for a streaming dataset (unknown until read)
    empty: int  # empty texts (skipped: they have no tokens)


def open_dataset(dataset_cfg: DatasetConfig) -> Any:
    """Open the configured dataset split (streaming where asked) without reading it all."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(dataset_cfg.path)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            data = load_from_disk(str(path))
            if isinstance(data, DatasetDict):
                if dataset_cfg.split not in data:
                    raise QkcoreError(
                        f"dataset.split: '{dataset_cfg.split}' not in {path} (splits: {', '.join(data)})"
                    )
                data = data[dataset_cfg.split]
            return data.to_iterable_dataset() if dataset_cfg.streaming else data
        if path.is_file():
            builder = _LOCAL_FORMATS.get(path.suffix.lower())
            if builder is None:
                raise QkcoreError(
                    f"dataset.path: unsupported file type '{path.suffix}' ({path}); "
                    f"expected one of {', '.join(sorted(_LOCAL_FORMATS))}"
                )
            if path.stat().st_size == 0:
                raise QkcoreError(f"dataset.path: {path} is empty")
            if builder == "json":
                _check_json_lines(path)
            return load_dataset(builder, data_files=str(path), split="train", streaming=dataset_cfg.streaming)
        return load_dataset(
            dataset_cfg.path, dataset_cfg.name, split=dataset_cfg.split, streaming=dataset_cfg.streaming
        )
    except QkcoreError:
        raise
    except Exception as exc:  # datasets raises many types for a bad path/split
        reason = str(exc).strip() or type(exc).__name__
        raise QkcoreError(f"dataset.path: cannot open '{dataset_cfg.path}': {reason}") from exc


def _check_json_lines(path: Path) -> None:
    """Name the first line of a JSON Lines file that is not a JSON object (datasets' own error does not)."""
    if path.suffix.lower() != ".jsonl":
        return
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError
                raise QkcoreError(f"dataset.path: {path} line {number} is not valid JSON ({exc})") from None
            if not isinstance(value, dict):
                raise QkcoreError(f"dataset.path: {path} line {number} is a JSON {type(value).__name__}, not an object")


def check_columns(data: Any, dataset_cfg: DatasetConfig) -> None:
    """Fail early, naming the missing column and the columns that exist."""
    columns = list(data.column_names or []) if getattr(data, "column_names", None) is not None else None
    if columns is None:
        return  # streaming datasets may not know their columns before reading
    for key in ("text_column", "id_column"):
        column = getattr(dataset_cfg, key)
        if column is not None and column not in columns:
            raise QkcoreError(
                f"dataset.{key}: column '{column}' not found in {dataset_cfg.path} (columns: {', '.join(columns)})"
            )


def check_documents(data: Any, dataset_cfg: DatasetConfig) -> DocumentCheck:
    """Check every document's text and id before any compute; raise naming the first bad row.

    For an in-memory dataset this reads only the Arrow columns (types, nulls, lengths,
    ids). A streaming dataset is checked while it is read (:func:`iter_documents`).
    (``max_samples: 0`` is refused by the run's config check, ``stages.load.check_config``.)
    """
    table = getattr(data, "data", None)
    if table is None or not hasattr(data, "__len__"):
        return DocumentCheck(documents=None, empty=0)
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(data) if dataset_cfg.max_samples is None else min(len(data), dataset_cfg.max_samples)
    if n == 0:
        raise QkcoreError(f"dataset.path: {dataset_cfg.path} has no documents")
    ids = _raw_ids(data, dataset_cfg, n)
    texts = table.column(dataset_cfg.text_column).slice(0, n)
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type) or pa.types.is_string_view(texts.type)):
        row, value = _first_non_string(data, dataset_cfg.text_column, n)
        raise QkcoreError(_bad_text(dataset_cfg, row, ids[row], value))
    if texts.null_count:
        row = pc.index(pc.is_null(texts), True).as_py()
        raise QkcoreError(_bad_text(dataset_cfg, row, ids[row], None))
    empty = int(pc.sum(pc.equal(pc.utf8_length(texts), 0)).as_py() or 0)
    if empty == n:
        raise QkcoreError(f"dataset.text_column: all {n} texts in column '{dataset_cfg.text_column}' are empty")
    seen: dict[int, int] = {}
    for row, raw in enumerate(ids):
        _check_unique(seen, normalize_example_id(raw), row, ids, dataset_cfg)
    return DocumentCheck(documents=n, empty=empty)


def _first_non_string(data: Any, column: str, n: int) -> tuple[int, Any]:
    """The first row whose value (decoded as the dataset's features decode it) is not a string."""
    row = 0
    for batch in data.select_columns([column]).iter(batch_size=1024):
        for value in batch[column]:
            if row >= n:
                break
            if not isinstance(value, str):
                return row, value
            row += 1
    return 0, None


def _raw_ids(data: Any, dataset_cfg: DatasetConfig, n: int) -> list[Any]:
    if not dataset_cfg.id_column:
        return list(range(n))
    return data.data.column(dataset_cfg.id_column).slice(0, n).to_pylist()


def _bad_text(dataset_cfg: DatasetConfig, row: int, raw_id: Any, value: Any) -> str:
    what = "no text (null)" if value is None else f"a {type(value).__name__} ({_short(value)}), not text"
    return f"dataset.text_column: row {row} (id {raw_id!r}) of {dataset_cfg.path} has {what} in column '{dataset_cfg.text_column}'"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_unique(seen: dict[int, int], example_id: int, row: int, raw_ids: Any, dataset_cfg: DatasetConfig) -> None:
    first = seen.setdefault(example_id, row)
    if first != row:
        raise QkcoreError(
            f"dataset.id_column: rows {first} and {row} of {dataset_cfg.path} share example id {raw_ids[row]!r}"
            + (f" (and {raw_ids[first]!r})" if raw_ids[first] != raw_ids[row] else "")
            + "; example ids must be unique, or the two documents' rows cannot be told apart"
        )


def iter_documents(data: Any, dataset_cfg: DatasetConfig) -> Iterator[Document]:
    """Yield documents in dataset order, at most ``max_samples`` of them, checking each one.

    A null or non-string text, or an id shared with an earlier row, raises naming the row.
    """
    rows = iter(data)
    if dataset_cfg.max_samples is not None:
        rows = islice(rows, dataset_cfg.max_samples)
    seen: dict[int, int] = {}
    raw_ids: dict[int, Any] = {}
    for index, row in enumerate(rows):
        if dataset_cfg.text_column not in row:
            raise QkcoreError(
                f"dataset.text_column: column '{dataset_cfg.text_column}' not found (columns: {', '.join(row)})"
            )
        text = row[dataset_cfg.text_column]
        raw_id = row[dataset_cfg.id_column] if dataset_cfg.id_column else index
        if not isinstance(text, str):
            raise QkcoreError(_bad_text(dataset_cfg, index, raw_id, text))
        example_id = normalize_example_id(raw_id)
        raw_ids[index] = raw_id
        _check_unique(seen, example_id, index, raw_ids, dataset_cfg)
        yield Document(example_id, text, index)


def document_count(data: Any, dataset_cfg: DatasetConfig) -> int | None:
    """Number of documents the run will read, when known without reading them."""
    try:
        total = len(data)
    except TypeError:
        return dataset_cfg.max_samples
    return min(total, dataset_cfg.max_samples) if dataset_cfg.max_samples is not None else total
