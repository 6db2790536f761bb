"""Run configuration: YAML file + environment + ``--set`` overrides, validated by pydantic.

Precedence (highest first): ``--set key.path=value`` > ``QKCORE_<SECTION>__<KEY>``
environment variables > the YAML file > defaults. YAML written for the original
``sniff-qk`` tool loads unchanged; keys qkcore no longer uses are accepted with a
:class:`QkcoreConfigWarning` (see :data:`LEGACY_KEYS`), truly unknown keys are an error.

pydantic-settings reads the environment (:class:`_MappingEnvSource`); the layers are
then merged here rather than by ``BaseSettings`` itself, because env values are parsed
as YAML scalars like ``--set`` values, tests inject their own env mapping, and every
error must name where the bad key came from (file, variable or ``--set``).
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

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
    "capture.queue_size": "qkcore has no background writer queue",
    "capture.max_rows_per_batch": "rows are bounded by the sampler and output.flush_threshold_mb",
    "capture.capture_token_strings": "capturing token strings is not supported",
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
    max_samples: int | None = Field(default=None, gt=0)
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
    def _device_index(cls, value: int | str | dict[str, Any] | None) -> int | str | dict[str, Any] | None:
        if isinstance(value, int) and (isinstance(value, bool) or value < 0):
            raise ValueError("a CUDA device index must be an integer >= 0")
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


class InferenceConfig(_Section):
    """Forward-pass settings."""

    batch_size: int = Field(default=1, ge=1)
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


class SamplerConfig(_Section):
    """Which rows (token positions) to keep; ``type`` is checked by the sniff step."""

    type: str = "log_uniform"
    base_rate: float = Field(default=1.0, gt=0)


class CaptureConfig(_Section):
    """What to capture."""

    capture_queries: bool = True
    capture_keys: bool = True
    layers: list[int] | None = None
    heads: list[int] | None = None
    head_sampling: HeadSamplingConfig | None = None
    full_attention_only: bool = False
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    max_rows_per_batch: int | None = None  # legacy: stored, ignored
    min_bucket_size: int = Field(default=128, ge=1)
    capture_pre_rope: bool = False
    capture_token_strings: bool = False  # legacy: not supported, ignored


class OutputConfig(_Section):
    """Where the dataset goes (locally and on the Hub)."""

    data_root: Path = Field(default=Path("data"), validate_default=True)  # resolved like a given value
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

    @field_validator("data_root")
    @classmethod
    def _data_root(cls, value: Path) -> Path:
        return _abspath(value)  # cwd-relative, like sniff-qk (not config-file-relative)

    @property
    def readme_file(self) -> Path:
        """The dataset card path: ``readme_path`` if absolute, else under ``data_root``."""
        path = self.readme_path.expanduser()
        return path if path.is_absolute() else self.data_root / path


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

_Key = tuple[str, ...]
_OriginOf = Callable[[_Key], str]  # dotted key path -> where its value came from


def _dotted(path: Sequence[str | int]) -> str:
    return ".".join(str(p) for p in path)


def _set_path(tree: dict[str, Any], path: _Key, value: Any) -> None:
    """Set ``tree[path[0]][path[1]]... = value``, creating (or replacing non-dict) parents."""
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _parse_value(text: str, origin: str) -> Any:
    """Parse an override value as YAML (so ``null``, ``[0, 1]``, ``4.0`` get their types)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: value is not valid YAML: {exc}") from None


def _env_layer(env: Mapping[str, str], sections: set[str]) -> list[tuple[_Key, Any, str]]:
    """``QKCORE_<SECTION>__<KEY>[__<SUBKEY>]`` variables as (path, value, origin).

    pydantic-settings reads the variables (prefix, ``__`` nesting, case, JSON for
    lists and mappings); each leaf is then parsed as a YAML scalar like ``--set``
    values, and keeps its variable name for error messages. Variables that are
    not config keys (e.g. ``QKCORE_LOG_LEVEL``) are ignored; unknown keys inside a
    section are kept so the key check reports them.
    """
    found: list[tuple[_Key, Any, str]] = []

    def leaves(path: _Key, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                leaves((*path, str(key).lower()), child)
            return
        origin = "$" + ENV_PREFIX + _ENV_DELIMITER.join(str(p) for p in path).upper()
        found.append((path, _parse_value(value, origin) if isinstance(value, str) else value, origin))

    for section, value in _MappingEnvSource(env)().items():
        if section in sections:
            leaves((section,), value)
    # Shorter paths first, so QKCORE_CAPTURE__SAMPLER__TYPE beats QKCORE_CAPTURE__SAMPLER.
    return sorted(found, key=lambda item: (len(item[0]), item[0]))


def _set_layer(overrides: Sequence[str]) -> list[tuple[_Key, Any, str]]:
    """``--set key.path=value`` strings as (path, value, origin), in order given."""
    found = []
    for item in overrides:
        origin = f"--set {item}"
        key, sep, text = item.partition("=")
        path = tuple(part.strip() for part in key.split("."))
        if not sep or not all(path):
            raise ConfigError(f"{origin}: expected key.path=value")
        found.append((path, _parse_value(text, origin), origin))
    return found


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The model class behind a field annotation (``X`` or ``X | None``), if any."""
    candidates = getattr(annotation, "__args__", (annotation,))
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _check_keys(
    data: dict[str, Any],
    model: type[BaseModel],
    prefix: _Key,
    origin_of: _OriginOf,
    errors: list[str],
) -> None:
    """Drop/warn legacy keys and collect unknown-key errors, recursing into sub-sections."""
    fields = {name: info for name, info in model.model_fields.items() if not info.exclude}
    for key in list(data):
        path = (*prefix, str(key))
        dotted = _dotted(path)
        value = data[key]
        if dotted in LEGACY_KEYS:
            if value is not None and value is not False:
                warnings.warn(
                    f"{origin_of(path)}: '{dotted}' is ignored by qkcore ({LEGACY_KEYS[dotted]})",
                    QkcoreConfigWarning,
                    stacklevel=4,
                )
            if key not in fields:
                del data[key]
            continue
        if key not in fields:
            known = [_dotted((*prefix, name)) for name in fields]
            close = difflib.get_close_matches(dotted, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            errors.append(f"{origin_of(path)}: unknown key '{dotted}'{hint}")
            continue
        info = fields[key]
        sub = _section_type(info.annotation)
        if sub is None:
            continue
        if value is None and not info.is_required() and info.default is not None:
            del data[key]  # an empty section (``capture:``) means "all defaults"
        elif isinstance(value, dict):
            _check_keys(value, sub, path, origin_of, errors)


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
    label = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read config file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: invalid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: top level must be a mapping of sections, got {type(data).__name__}")

    sections = {name for name, info in SniffConfig.model_fields.items() if not info.exclude}
    origins: dict[_Key, str] = {}
    layers = _env_layer(os.environ if env is None else env, sections) + _set_layer(overrides)
    for key_path, value, origin in layers:
        _set_path(data, key_path, value)
        origins[key_path] = origin

    def origin_of(key_path: _Key) -> str:
        # The override that set this key or one of its parents, else the file.
        for n in range(len(key_path), 0, -1):
            if key_path[:n] in origins:
                return origins[key_path[:n]]
        return label

    errors: list[str] = []
    _check_keys(data, SniffConfig, (), origin_of, errors)
    if errors:
        raise ConfigError("\n".join(errors))
    try:
        cfg = SniffConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, data, origin_of)) from None
    cfg.source = _abspath(path)
    return cfg


class _EnvSections(BaseSettings):
    """The run config's sections as pydantic-settings sees them; used only to read the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=_ENV_DELIMITER, case_sensitive=False, extra="ignore"
    )

    dataset: DatasetConfig | None = None
    model: ModelConfig | None = None
    tokenizer: TokenizerConfig | None = None
    inference: InferenceConfig | None = None
    capture: CaptureConfig | None = None
    output: OutputConfig | None = None


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping (``os.environ`` or a test's)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._mapping = env
        super().__init__(_EnvSections)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._mapping.items()}
