"""Run configuration: YAML file + environment + ``--set`` overrides, validated by pydantic.

Precedence (highest first): ``--set key.path=value`` > ``QKCORE_<SECTION>__<KEY>``
environment variables > the YAML file > defaults. YAML written for the original
``sniff-qk`` tool loads unchanged; keys qkcore no longer uses are accepted with a
:class:`QkcoreConfigWarning` (see :data:`LEGACY_KEYS`), truly unknown keys are an error.

pydantic-settings' environment source reads the variables; the file and ``--set`` items are
read, and the layers merged, here (the comment above :func:`load_config`'s helpers says why
pydantic-settings' other sources would not do), so that every error names where the bad
key came from: the file, the variable or the ``--set`` item.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from qkcore.output.store import check_storage_options, url_scheme

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "ENV_PREFIX",
    "LEGACY_KEYS",
    "CaptureConfig",
    "ConfigError",
    "DatasetConfig",
    "HeadSamplingConfig",
    "InferenceConfig",
    "ModelConfig",
    "OutputConfig",
    "QkcoreConfigWarning",
    "SamplerConfig",
    "SniffConfig",
    "TokenizerConfig",
    "config_to_dict",
    "load_config",
    "resolve_dtype",
]

ENV_PREFIX = "QKCORE_"
_ENV_DELIMITER = "__"

#: ``sniff-qk`` keys that qkcore accepts but no longer acts on: dotted key -> reason.
#: A key listed here that is also a model field is kept (stored); otherwise it is
#: dropped. Either way a warning is issued when its value is set (not null/false).
LEGACY_KEYS: dict[str, str] = {
    "capture.queue_size": "qkcore sizes its writer queue by output.flush_threshold_mb",
    "inference.distributed": "qkcore runs distributed under torchrun (see README)",
    "inference.backend": "qkcore runs distributed under torchrun (see README)",
    "inference.mps_cleanup_every_batches": "qkcore does no periodic MPS cache cleanup",
}

# Accepted dtype spellings (lower-cased) -> canonical name stored in the config.
_DTYPE_ALIASES: dict[str, str] = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "auto": "auto",
}


class ConfigError(ValueError):
    """A configuration problem, with a message naming the source and the key."""


class QkcoreConfigWarning(UserWarning):
    """A config key was accepted but has no effect in qkcore."""


#: Other spellings of sampler types (lower-cased) -> the registered name.
SAMPLER_ALIASES = {"log": "log_uniform"}


#: The forms ``model.device_map`` takes.
DEVICE_FORMS = "'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a CUDA index N"


def parse_device_map(device_map: Any) -> tuple[str, int | None] | None:
    """``model.device_map`` as ``(kind, index)`` (``cpu``/``cuda``/``mps``), ``None`` for ``auto``; ``ValueError`` if malformed.

    The one check of the key's form (no torch needed); ``sources.model.resolve_device``
    then asks whether this machine has that device.
    """
    if device_map is None or device_map == "auto":
        return None
    if isinstance(device_map, dict):
        places = {str(place) for place in device_map.values()}
        if len(places) == 1:  # e.g. {"": "cuda:0"}: everything on one device
            return parse_device_map(next(iter(device_map.values())))
        raise ValueError(f"only a single device is supported (got {device_map!r})")
    if isinstance(device_map, bool) or not isinstance(device_map, (int, str)):
        raise ValueError(f"expected {DEVICE_FORMS} (got {device_map!r})")
    if isinstance(device_map, int) and device_map < 0:
        raise ValueError("a CUDA device index must be an integer >= 0")
    text = f"cuda:{device_map}" if isinstance(device_map, int) else device_map.strip().lower()
    if text.isdigit():
        text = f"cuda:{text}"
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", text)
    if match is None or (match.group(1) != "cuda" and match.group(2) not in (None, "0")):
        raise ValueError(f"{device_map!r} is not a device; use {DEVICE_FORMS}")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def check_base_rate(value: Any) -> float:
    """The rule of ``capture.sampler.base_rate``: a finite number > 0 (the config and every sampler apply it).

    ``ValueError`` says what it must be; the caller names the key and the value.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError("must be a positive number")
    if not (math.isfinite(float(value)) and value > 0):
        raise ValueError("must be a finite number > 0")
    return float(value)


def check_min_bucket_size(value: Any) -> int:
    """The rule of ``capture.min_bucket_size``: an integer >= 1 (the config and every sampler apply it)."""
    try:
        size = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        size = None
    if size is None or size < 1:
        raise ValueError("must be an integer >= 1")
    return size


def _warn(message: str) -> None:
    warnings.warn(message, QkcoreConfigWarning, stacklevel=2)


def _canonical_dtype(name: str) -> str:
    """Return the canonical dtype name for an accepted spelling, else raise ConfigError."""
    canonical = _DTYPE_ALIASES.get(str(name).strip().lower())
    if canonical is None:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {', '.join(_DTYPE_ALIASES)}")
    return canonical


def resolve_dtype(name: str) -> torch.dtype | str:
    """Map a dtype name (``bf16``, ``float16``, ``auto``, ...) to a ``torch.dtype`` or ``"auto"``."""
    canonical = _canonical_dtype(name)
    if canonical == "auto":
        return "auto"
    import torch  # lazy: loading a config should not pay for importing torch

    return getattr(torch, canonical)


def _abspath(value: str | Path) -> Path:
    """Expand ``~`` and make ``value`` absolute relative to the current working directory."""
    return Path(os.path.abspath(os.path.expanduser(str(value))))


class _Section(BaseModel):
    """Base for config sections: unknown keys are rejected (backstop to load_config's check)."""

    model_config = ConfigDict(extra="forbid")


class DatasetConfig(_Section):
    """Which text dataset to run through the model."""

    path: str
    name: str | None = None
    split: str = "train"
    text_column: str = "text"
    id_column: str | None = None
    # 0 loads (as in sniff-qk), but a run refuses it: it would capture nothing.
    max_samples: int | None = Field(default=None, ge=0)
    streaming: bool = False

    @field_validator("path")
    @classmethod
    def _local_path_absolute(cls, value: str) -> str:
        # Like sniff-qk: an existing local path is taken relative to the cwd; anything
        # else is a Hub dataset id and stays as written.
        return str(_abspath(value)) if os.path.exists(os.path.expanduser(value)) else value


class ModelConfig(_Section):
    """Which model to load (``name``, ``gguf_file``) or build with random weights (``config``)."""

    name: str | None = None
    revision: str | None = None
    dtype: str = "float16"
    #: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a CUDA index ``N`` (checked when loading).
    device_map: int | str | dict[str, Any] | None = "auto"
    trust_remote_code: bool = False
    # None means "sdpa"; normalised so consumers see the effective value.
    attn_implementation: str | None = "sdpa"
    config_overrides: dict[str, Any] | None = None
    #: Architecture for a randomly initialised model: path to a config.json (or a
    #: directory holding one) or an inline dict with ``model_type``. Never downloaded.
    config: str | dict[str, Any] | None = None
    #: Seed for the random initialisation used with ``config``.
    init_seed: int = 0
    #: A GGUF checkpoint (weights and tokenizer; dequantized when loaded): a file name in
    #: ``name``'s folder or Hub repo, ``package:PKG/FILE`` (a file of an installed Python
    #: package), or, with ``name`` unset, a path (then ``name`` becomes the file's stem).
    gguf_file: str | None = None

    @field_validator("device_map")
    @classmethod
    def _device(cls, value: int | str | dict[str, Any] | None) -> int | str | dict[str, Any] | None:
        parse_device_map(value)  # the form only: whether this machine has the device is known when it loads
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        return _canonical_dtype(value)

    @field_validator("attn_implementation")
    @classmethod
    def _attn(cls, value: str | None) -> str:
        return value or "sdpa"

    @field_validator("config")
    @classmethod
    def _config(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, dict):
            if "model_type" not in value:
                raise ValueError("an inline model config needs a 'model_type' key")
            return value
        if value is None:
            return None
        path = _abspath(value)  # relative to the cwd, like every other path
        if not path.exists():
            raise ValueError(f"no such file or directory: {path}")
        return str(path)

    @model_validator(mode="after")
    def _name_or_config(self) -> ModelConfig:
        if self.gguf_file is not None:
            if self.config is not None:
                raise ValueError("model.config (random weights) and model.gguf_file (trained weights) exclude each other")
            if self.name is None:
                # No folder or repo to look in: the file is a path (cwd-relative) and names the run.
                if not self.gguf_file.startswith("package:"):
                    self.gguf_file = str(_abspath(self.gguf_file))
                self.name = Path(self.gguf_file.removeprefix("package:")).stem
        if self.name is None and self.config is None:
            raise ValueError(
                "model.name is required (or model.config for a randomly initialised model, or model.gguf_file)"
            )
        return self


class TokenizerConfig(_Section):
    """Tokenizer settings; ``name`` defaults to ``model.name``."""

    name: str | None = None
    revision: str | None = None
    max_length: int = Field(default=4096, gt=0)
    padding: str = "longest"
    trust_remote_code: bool = False
    padding_side: Literal["left", "right"] = "right"

    @field_validator("padding")
    @classmethod
    def _padding(cls, value: str) -> str:
        if value != "longest":
            _warn(f"tokenizer.padding: {value!r} is ignored: qkcore tokenises each document alone and right-pads "
                  "batches to their longest document")
        return value

    @field_validator("padding_side")
    @classmethod
    def _padding_side(cls, value: str) -> str:
        if value == "left":
            _warn("tokenizer.padding_side: 'left' is ignored: qkcore right-pads, so a token's position is its index "
                  "in its document and padding is never attended to")
        return value


class InferenceConfig(_Section):
    """Forward-pass settings."""

    batch_size: int = Field(default=1, ge=1)
    #: issue 19: ranks of a torchrun run that split each attention layer's heads (qkcore.tensor_parallel).
    tensor_parallel_size: int = Field(default=1, ge=1)
    autocast_dtype: str = "float16"
    debug_logging: bool = False
    debug_log_every_n_batches: int | None = Field(default=None, ge=1)
    mps_cleanup_every_batches: int | None = None  # legacy: stored, ignored

    @field_validator("autocast_dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        return _canonical_dtype(value)


class HeadSamplingConfig(_Section):
    """Capture a random subset of ``count`` (layer, head) pairs instead of all."""

    count: int = Field(ge=1)
    seed: int = 0
    #: Which (layer, head) pairs are sampled from (see :mod:`qkcore.heads`):
    #: ``eligible_layers`` (the layers that can be captured, so ``count`` heads are captured)
    #: or ``all_decoder_layers`` (the original sniff-qk's list, cross-attention layers
    #: included; picks there are not captured, so fewer than ``count`` may be).
    candidates: Literal["eligible_layers", "all_decoder_layers"] = "eligible_layers"


class SamplerConfig(_Section):
    """Which rows (token positions) to keep; ``type`` names a sampler a plugin registers (``stages.plan.build_sampler``).

    Like sniff-qk, ``type`` is case-insensitive; ``log`` (sniff-qk's name for it in its
    cards) means ``log_uniform``.
    """

    type: str = "log_uniform"
    base_rate: float = 1.0

    @field_validator("base_rate", mode="before")
    @classmethod
    def _base_rate(cls, value: Any) -> float:
        return check_base_rate(value)

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        name = value.strip().lower()
        return SAMPLER_ALIASES.get(name, name)


class CaptureConfig(_Section):
    """What to capture."""

    capture_queries: bool = True
    capture_keys: bool = True
    # An empty list means "no filter", as in sniff-qk.
    layers: list[int] | None = None
    heads: list[int] | None = None
    head_sampling: HeadSamplingConfig | None = None
    full_attention_only: bool = False
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    #: At most this many rows per (document, layer, kind), picked as sniff-qk picks them (a seeded permutation).
    max_rows_per_batch: int | None = None
    min_bucket_size: int = 128
    capture_pre_rope: bool = False
    #: Undo a family's post-RoPE query scaling (e.g. Ministral 3's position scale) so query
    #: rows are exactly post-RoPE; by default they are the query the attention kernel receives.
    unscaled_queries: bool = False
    #: Add a ``token_str`` column: the tokenizer's token at each row (``convert_ids_to_tokens``, as in sniff-qk).
    capture_token_strings: bool = False

    @field_validator("min_bucket_size", mode="before")
    @classmethod
    def _min_bucket_size(cls, value: Any) -> int:
        return check_min_bucket_size(value)

    @field_validator("layers", "heads")
    @classmethod
    def _empty_is_no_filter(cls, value: list[int] | None) -> list[int] | None:
        return value or None


class OutputConfig(_Section):
    """Where the dataset goes (locally and on the Hub)."""

    #: A local folder (a ``Path``, made absolute) or a URL on object storage (a ``str``:
    #: ``s3://bucket/prefix``, ``gs://``, ``hf://``; see ``output/remote.py``).
    data_root: Path | str = Field(default=Path("data"), validate_default=True)  # resolved like a given value
    #: Options of the store's fsspec filesystem (``endpoint_url``, ``region_name``...); never credentials.
    storage_options: dict[str, Any] | None = None
    #: Kept for sniff-qk configs; the card is always DATA_ROOT/README.md (as in sniff-qk), so
    #: ``load_dataset(data_root, config)`` finds its configs.
    readme_path: Path = Path("README.md")
    hf_repo_id: str | None = None
    hf_branch: str | None = None
    private: bool = False
    #: Parquet row-group size (rows); None lets the writer choose.
    write_batch_size: int | None = Field(default=None, ge=1)
    #: Flush buffered rows once they take this much host RAM (MiB).
    flush_threshold_mb: float = Field(default=256.0, gt=0)
    #: Commit progress (for crash-resume) after a batch once this many seconds passed
    #: since the last commit; 0 commits after every batch.
    commit_every_s: float = Field(default=10.0, ge=0)
    #: Seconds any one Hub request may wait (connect, send, each read) before it fails.
    hub_timeout_s: float = Field(default=60.0, gt=0)
    #: Retries of a Hub step after a transient failure (5xx, 429, timeout, connection error).
    hub_retries: int = Field(default=5, ge=0)

    #: The dataset's licence for the card's metadata, when known (e.g. the model's licence).
    license: str | None = None

    @field_validator("data_root", mode="before")
    @classmethod
    def _data_root(cls, value: Any) -> Path | str:
        if isinstance(value, str) and url_scheme(value) is not None:
            return value.rstrip("/")  # a URL: Path() would fold its "//"
        if isinstance(value, str) and value.lower().startswith("file://"):
            value = value[len("file://"):]
        if not isinstance(value, (str, Path)):
            raise ValueError(f"expected a folder or a URL, got {type(value).__name__}")
        return _abspath(value)  # cwd-relative, like sniff-qk (not config-file-relative)

    @field_validator("storage_options")
    @classmethod
    def _storage_options(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else check_storage_options(value)

    @field_validator("readme_path")
    @classmethod
    def _readme_path(cls, value: Path) -> Path:
        if value != Path("README.md"):
            _warn(f"output.readme_path: {str(value)!r} is ignored: the card is always DATA_ROOT/README.md "
                  "(as in sniff-qk), where load_dataset(data_root, config) finds it")
        return value


class SniffConfig(_Section):
    """A whole run configuration."""

    dataset: DatasetConfig
    model: ModelConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    #: The file this config was loaded from (not part of dumps).
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _tokenizer_defaults_to_model(self) -> SniffConfig:
        if self.tokenizer.name is None:
            self.tokenizer.name = self.model.name
        return self


def config_to_dict(cfg: SniffConfig) -> dict[str, Any]:
    """Return ``cfg`` as a plain JSON-able dict (for the dataset card and logs)."""
    return cfg.model_dump(mode="json")


# --------------------------------------------------------------------------- loading
#
# The layers are read and merged here, not by a ``BaseSettings`` with ``settings_customise_sources``,
# because pydantic-settings' other sources would each lose a guarantee of load_config:
# - ``YamlConfigSettingsSource`` returns {} for a missing file, fails with dict.update's bare
#   ValueError/TypeError on a top level that is not a mapping, and parses a stream, which
#   changes PyYAML's error messages.
# - ``CliSettingsSource`` parses argparse flags, not ``key.path=value`` items: it cannot reach into a
#   free dict (``model.config_overrides.rope_scaling.factor``), reads values as JSON, not YAML, and
#   answers an unknown key with argparse's "unrecognized arguments" instead of naming the key.
# - ``BaseSettings`` merges its sources with ``deep_update`` and keeps only the result: an error could
#   no longer name the layer that set the key, and a mapping given by ``--set`` would be merged into
#   the file's section instead of replacing it.
# pydantic-settings' ``EnvSettingsSource`` reads the environment (:func:`_env_items`).

_Key = tuple[str, ...]
_Item = tuple[_Key, Any, str]  # (key path, value, where the value came from)
_OriginOf = Callable[[_Key], str]


class _EnvSettings(BaseSettings):
    """How run config keys are spelled as environment variables (``QKCORE_CAPTURE__SAMPLER__TYPE``).

    Decoding is off, so each variable arrives as its raw string, to be parsed as YAML like a
    ``--set`` value (pydantic-settings would parse some as JSON).
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=_ENV_DELIMITER, enable_decoding=False
    )


#: The run config's sections, for pydantic-settings' environment source (which reads only these).
_EnvSections = create_model(
    "_EnvSections",
    __base__=_EnvSettings,
    **{name: (info.annotation, None) for name, info in SniffConfig.model_fields.items() if not info.exclude},
)


def _dotted(path: Sequence[str | int]) -> str:
    return ".".join(str(p) for p in path)


def _yaml_problem(exc: yaml.YAMLError, *, lines: bool = True) -> str:
    """PyYAML's multi-line report as one phrase: where (line and column, 1-based), what, and what it was inside."""
    problem = getattr(exc, "problem", None)
    mark, context, start = (getattr(exc, name, None) for name in ("problem_mark", "context", "context_mark"))
    if problem is None or mark is None:
        return " ".join(str(exc).split())

    def at(where: Any) -> str:
        return f"line {where.line + 1}, column {where.column + 1}" if lines else f"column {where.column + 1}"

    text = f"{at(mark)}: {problem}"
    if context:
        text += f" ({context}" + (f" at {at(start)})" if start is not None else ")")
    return text


def _parse_value(text: str, origin: str) -> Any:
    """Parse an override value as YAML (so ``null``, ``[0, 1]``, ``4.0`` get their types)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: value is not valid YAML: {_yaml_problem(exc, lines=False)}") from None


def _read_file(path: str | Path) -> dict[str, Any]:
    """The YAML file's mapping of sections; a missing, unreadable or malformed file is a ConfigError."""
    label = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{label}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: invalid YAML at {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _leaves(tree: Any, path: _Key = ()) -> Iterator[tuple[_Key, Any]]:
    """(key path, value) for each value in nested mappings below ``path``; ``{}`` there is a value."""
    if isinstance(tree, dict) and (tree or not path):
        for key, child in tree.items():
            yield from _leaves(child, (*path, str(key)))
    else:
        yield path, tree


def _env_items(env: Mapping[str, str] | None) -> list[_Item]:
    """``QKCORE_<SECTION>__<KEY>[__<SUBKEY>]`` variables as items, in rising precedence.

    pydantic-settings' source maps each variable to its key path (prefix, ``__`` nesting, any
    case) and ignores those that name no section (``QKCORE_LOG_LEVEL``). A value that parses to
    a mapping is spread into its keys, so it merges into the file's section key by key.
    """
    source = EnvSettingsSource(_EnvSections)
    found = []
    for name, text in (os.environ if env is None else env).items():
        if not name.upper().startswith(ENV_PREFIX):
            continue  # not ours; skipped here only because a call to the source is slow (~0.4 ms)
        # The source reads os.environ and takes no other mapping (pydantic-settings#653), so each
        # variable is put in env_vars, the mapping it looks variables up in. One at a time, because
        # of QKCORE_CAPTURE__SAMPLER and QKCORE_CAPTURE__SAMPLER__TYPE it would keep only one.
        source.env_vars = parse_env_vars({name: text})
        found += [(path, raw, "$" + name) for path, raw in _leaves(source())]
    items: list[_Item] = []
    # Shorter paths first, so QKCORE_CAPTURE__SAMPLER__TYPE beats QKCORE_CAPTURE__SAMPLER.
    for path, raw, origin in sorted(found, key=lambda item: len(item[0])):
        items += [(key_path, value, origin) for key_path, value in _leaves(_parse_value(raw, origin), path)]
    return items


def _set_items(overrides: Sequence[str]) -> list[_Item]:
    """``--set key.path=value`` strings as items, in the order given."""
    items = []
    for item in overrides:
        key, sep, text = item.partition("=")
        # storage_options is refused when it holds a secret: its message must not repeat the value
        origin = f"--set {key}=..." if key.strip().startswith("output.storage_options") else f"--set {item}"
        path = tuple(part.strip() for part in key.split("."))
        if not sep or not all(path):
            raise ConfigError(f"{origin}: expected key.path=value")
        items.append((path, _parse_value(text, origin), origin))
    return items


def _set_path(tree: dict[str, Any], path: _Key, value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, creating (or replacing non-dict) parents."""
    for part in path[:-1]:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree[path[-1]] = value


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The model class behind a field annotation (``X`` or ``X | None``), if any."""
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _check_keys(data: dict[str, Any], model: type[BaseModel], prefix: _Key, origin_of: _OriginOf) -> list[str]:
    """Drop legacy and unknown ``inference`` keys (with a warning); return an error per unknown key."""
    fields = {name: info for name, info in model.model_fields.items() if not info.exclude}
    errors = []
    for key in list(data):
        path = (*prefix, str(key))
        dotted, value, info = _dotted(path), data[key], fields.get(key)
        if dotted in LEGACY_KEYS or (info is None and prefix == ("inference",)):
            # sniff-qk drops unknown inference keys: accept them, but say so.
            if dotted not in LEGACY_KEYS:
                _warn(f"{origin_of(path)}: '{dotted}' is not a qkcore key; ignored")
            elif value is not None and value is not False:
                _warn(f"{origin_of(path)}: '{dotted}' is ignored by qkcore ({LEGACY_KEYS[dotted]})")
            if info is None:
                del data[key]
        elif info is None:
            close = difflib.get_close_matches(dotted, [_dotted((*prefix, name)) for name in fields], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append(f"{origin_of(path)}: unknown key '{dotted}'{hint}")
        elif (section := _section_type(info.annotation)) is not None:
            if value is None and not info.is_required() and info.default is not None:
                del data[key]  # an empty section (``capture:``) means "all defaults"
            elif isinstance(value, dict):
                errors += _check_keys(value, section, path, origin_of)
    return errors


def _format_errors(exc: ValidationError, data: Any, origin_of: _OriginOf) -> str:
    """One line per bad key: ``<origin>: <dotted.key>: <message> (got <value>)``."""
    lines: dict[str, list[str]] = {}
    for err in exc.errors():
        # Keep the part of the location that exists in the data; pydantic appends
        # union-member tags (e.g. 'str') that mean nothing to the user.
        path: list[str | int] = []
        node = data
        for part in err["loc"]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                if err["type"] == "missing" and part == err["loc"][-1]:
                    path.append(part)
                break
            path.append(part)
        msg = err["msg"].removeprefix("Value error, ")
        # Whole-section inputs (from model-level checks) are too long to be useful.
        if err["type"] != "missing" and not (err["type"] == "value_error" and isinstance(err["input"], dict)):
            got = repr(err["input"])
            msg += f" (got {got if len(got) <= 80 else got[:77] + '...'})"
        head = f"{origin_of(tuple(str(p) for p in path))}: {_dotted(path) or '<top level>'}"
        if msg not in lines.setdefault(head, []):
            lines[head].append(msg)
    return "\n".join(f"{head}: {' or '.join(msgs)}" for head, msgs in lines.items())


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> SniffConfig:
    """Load and validate a run config from a YAML file, applying env and ``--set`` overrides.

    ``env=None`` reads ``os.environ``. Raises :class:`ConfigError` for any problem,
    with a message naming the file (or variable / ``--set``) and the dotted key.
    """
    data = _read_file(path)
    origins: dict[_Key, str] = {}
    for key_path, value, origin in _env_items(env) + _set_items(overrides):  # in rising precedence
        _set_path(data, key_path, value)
        origins[key_path] = origin

    def origin_of(key_path: _Key) -> str:
        # The override that set this key or one of its parents, else one that set a key
        # below it (``--set capture.samplr.type=all`` created ``capture.samplr``), else the file.
        for n in range(len(key_path), 0, -1):
            if key_path[:n] in origins:
                return origins[key_path[:n]]
        below = [origin for set_path, origin in origins.items() if set_path[: len(key_path)] == key_path]
        return below[-1] if below else str(path)

    errors = _check_keys(data, SniffConfig, (), origin_of)
    if errors:
        raise ConfigError("\n".join(errors))
    try:
        cfg = SniffConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, data, origin_of)) from None
    cfg.source = _abspath(path)
    return cfg
