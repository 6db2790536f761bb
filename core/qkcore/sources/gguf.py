"""GGUF checkpoints (``model.gguf_file``): where the file is, what is in it, and whether it can load.

transformers loads a GGUF itself (config, tokenizer and weights, dequantized to
a dense model); this module finds the file, reads its header to describe it
(architecture, quantisation) and checks the optional packages are installed,
so each problem is one clear error before anything is computed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections import Counter
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkcore.errors import QkcoreError
from qkcore.filehash import cached_by_identity
from qkcore.sources.locations import PACKAGE_PREFIX, package_file, pinned_revision, source_kind

if TYPE_CHECKING:  # pragma: no cover - typing only
    from qkcore.config import ModelConfig

#: How to install what GGUF loading needs.
INSTALL_HINT = "pip install 'qkcore[gguf]' (or bash scripts/install.sh)"
_REQUIRED = ("gguf", "accelerate")  # transformers' GGUF reader; accelerate for from_pretrained(gguf_file=)


@dataclass(frozen=True)
class GgufLocation:
    """Where ``model.gguf_file`` is: ``file`` inside ``folder`` (a local directory or a Hub repo)."""

    folder: str
    file: str
    local: bool

    @property
    def path(self) -> Path | None:
        """The local file (None for a Hub file not fetched yet)."""
        return Path(self.folder) / self.file if self.local else None


@dataclass(frozen=True)
class GgufMetadata:
    """What a GGUF header says about its weights."""

    architecture: str
    quantization: str  # the file type llama.cpp records, e.g. "Q4_1", "F16"
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type -> number of tensors


def require_gguf_support(key: str = "model.gguf_file") -> None:
    """Raise one clear error if a package GGUF loading needs is missing."""
    missing = []
    for name in _REQUIRED:
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a module set to None in sys.modules
            found = None
        if found is None:
            missing.append(name)
    if missing:
        raise QkcoreError(f"{key}: loading a GGUF checkpoint needs {' and '.join(missing)}: {INSTALL_HINT}")


def locate_gguf(model_cfg: ModelConfig) -> GgufLocation:
    """Where ``model.gguf_file`` is, per the rules in :class:`qkcore.config.ModelConfig`; errors if absent."""
    spec: str = model_cfg.gguf_file
    key = "model.gguf_file"
    if spec.startswith(PACKAGE_PREFIX):
        path = package_file(spec, key)
        return GgufLocation(str(path.parent), path.name, local=True)
    path = Path(os.path.expanduser(spec))
    if path.is_absolute():
        if not path.is_file():
            raise QkcoreError(f"{key}: no such file: {path}")
        return GgufLocation(str(path.parent), path.name, local=True)
    if source_kind(model_cfg.name, "model.name") == "local":
        path = Path(os.path.expanduser(model_cfg.name)) / spec
        if not path.is_file():
            raise QkcoreError(f"{key}: no file '{spec}' in the model directory {Path(model_cfg.name).resolve()}")
        return GgufLocation(str(path.parent), path.name, local=True)
    return GgufLocation(model_cfg.name, spec, local=False)


def gguf_path(location: GgufLocation, revision: str | None) -> Path:
    """The local file of ``location``, fetched into the Hub cache first if it is a Hub file."""
    if location.path is not None:
        return location.path
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(location.folder, location.file, revision=pinned_revision(location.folder, revision))
        )
    except Exception as exc:  # not found, offline without a cached copy, gated, ...
        raise QkcoreError(
            f"model.gguf_file: cannot fetch '{location.file}' from Hub repo '{location.folder}': {exc}"
        ) from exc


def gguf_metadata(path: Path, cache: MutableMapping[str, str] | None = None) -> GgufMetadata:
    """Architecture, quantisation type and tensor types from the GGUF header of ``path``.

    ``cache`` (the run's hash cache, see :mod:`qkcore.filehash`) keeps them by the
    file's identity: parsing a GGUF header costs seconds, a no-op rerun should not.
    """

    def read(real: Path) -> str:
        stat = real.stat()
        return json.dumps(asdict(_read_metadata(str(real), stat.st_size, stat.st_mtime_ns)), sort_keys=True)

    return GgufMetadata(**json.loads(cached_by_identity(path, cache, read, kind="gguf-metadata")))


@functools.lru_cache(maxsize=8)
def _read_metadata(path: str, size: int, mtime_ns: int) -> GgufMetadata:  # size/mtime: cache key only
    require_gguf_support()
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError / struct errors on a damaged file
        raise QkcoreError(f"model.gguf_file: {path} is not a readable GGUF file: {exc}") from exc

    def field_value(name: str) -> Any:
        entry = reader.fields.get(name)
        if entry is None:
            return None
        part = entry.parts[entry.data[0]]
        return bytes(part).decode("utf-8") if entry.types and entry.types[0].name == "STRING" else part[0]

    architecture = field_value("general.architecture") or "unknown"
    types = Counter(GGMLQuantizationType(tensor.tensor_type).name for tensor in reader.tensors)
    file_type = field_value("general.file_type")
    if file_type is not None:
        try:
            quantization = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except ValueError:
            quantization = f"file_type {int(file_type)}"
    else:  # older files: the commonest type of the 2-D (weight) tensors
        weights = Counter(GGMLQuantizationType(t.tensor_type).name for t in reader.tensors if len(t.shape) > 1)
        quantization = weights.most_common(1)[0][0] if weights else "unknown"
    return GgufMetadata(str(architecture), quantization, dict(sorted(types.items())))


def load_error(location: GgufLocation, what: str, exc: Exception) -> QkcoreError:
    """The error for transformers failing to load ``what`` (config, tokenizer, weights) from a GGUF.

    When the file holds an architecture transformers cannot read from GGUF, say so
    (and what it can read) instead of relaying the first symptom.
    """
    where = location.path or f"{location.folder}/{location.file}"
    detail = str(exc)
    if location.path is not None:
        architecture = gguf_metadata(location.path).architecture
        supported = supported_architectures()
        if architecture not in supported:
            detail = (
                f"it holds a '{architecture}' model, which this transformers cannot load from GGUF "
                f"(it can: {', '.join(supported)})"
            )
    return QkcoreError(f"model.gguf_file: cannot load the {what} of {where}: {detail}")


def supported_architectures() -> list[str]:
    """GGUF architectures the installed transformers can load (for error messages)."""
    names: set[str] = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        pass
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names - {"general", "tokenizer"})
