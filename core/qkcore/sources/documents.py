"""Reading documents: a hub dataset or local jsonl/json/parquet/csv/txt files or a ``save_to_disk`` folder."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from qkcore.errors import QkcoreError
from qkcore.example_ids import normalize_example_id

_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


@dataclass(frozen=True)
class Document:
    """One text to capture, with its normalised 64-bit example id and its index in the dataset."""

    example_id: int
    text: str
    index: int = 0


def open_dataset(dataset_cfg: Any) -> Any:
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
                raise QkcoreError(f"dataset.path: unsupported file type '{path.suffix}' ({path})")
            return load_dataset(builder, data_files=str(path), split="train", streaming=dataset_cfg.streaming)
        return load_dataset(
            dataset_cfg.path, dataset_cfg.name, split=dataset_cfg.split, streaming=dataset_cfg.streaming
        )
    except QkcoreError:
        raise
    except Exception as exc:  # datasets raises many types for a bad path/split
        raise QkcoreError(f"dataset.path: cannot open '{dataset_cfg.path}': {exc}") from exc


def check_columns(data: Any, dataset_cfg: Any) -> None:
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


def iter_documents(data: Any, dataset_cfg: Any) -> Iterator[Document]:
    """Yield documents in dataset order, at most ``max_samples`` of them."""
    rows = iter(data)
    if dataset_cfg.max_samples is not None:
        rows = islice(rows, dataset_cfg.max_samples)
    for index, row in enumerate(rows):
        text = row.get(dataset_cfg.text_column)
        if dataset_cfg.text_column not in row:
            raise QkcoreError(
                f"dataset.text_column: column '{dataset_cfg.text_column}' not found (columns: {', '.join(row)})"
            )
        raw_id = row[dataset_cfg.id_column] if dataset_cfg.id_column else index
        yield Document(normalize_example_id(raw_id), "" if text is None else str(text), index)


def document_count(data: Any, dataset_cfg: Any) -> int | None:
    """Number of documents the run will read, when known without reading them."""
    try:
        total = len(data)
    except TypeError:
        return dataset_cfg.max_samples
    return min(total, dataset_cfg.max_samples) if dataset_cfg.max_samples is not None else total
