"""Loading the model: a hub id, a local directory, a GGUF file, or random weights from an architecture config.

Also the device and dtype a run uses (:func:`resolve_device`, :func:`precision`)
and what identifies its weights (:func:`model_identity`). Every problem with
these inputs is one :class:`~qkcore.errors.QkcoreError` naming the key, raised
before any forward pass.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import torch

from qkcore.config import parse_device_map, resolve_dtype
from qkcore.errors import QkcoreError
from qkcore.logs import library_bars_off
from qkcore.sources.gguf import (
    gguf_metadata,
    gguf_path,
    load_error,
    locate_gguf,
    require_gguf_support,
)
from qkcore.sources.locations import check_hub_repo, files_sha256, file_sha256, hub_commit, pinned_revision, source_kind

if TYPE_CHECKING:  # pragma: no cover - typing only
    from qkcore.config import ModelConfig

log = structlog.get_logger(__name__)

#: Weight files ``from_pretrained`` reads from a local directory (safetensors preferred).
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_TORCH_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: Config keys that label a config rather than shape the model built from it.
_CONFIG_LABELS = ("_name_or_path", "transformers_version")


# --------------------------------------------------------------------------- device and dtype


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    try:
        return bool(backend is not None and backend.is_available())
    except Exception:  # some builds raise instead of answering False
        return False


def resolve_device(device_map: Any) -> torch.device:
    """One device for the whole model: qkcore runs on a single accelerator (or the CPU).

    ``auto``/None: CUDA, else an Apple GPU (MPS), else the CPU. An integer is a CUDA
    index, as in the original tool. A device this machine lacks is an error, not a
    fallback: a run asked to use a GPU should not quietly take a day on the CPU.
    """
    key = "model.device_map"
    try:
        parsed = parse_device_map(device_map)  # the config checked it already; direct callers are checked here
    except ValueError as exc:
        raise QkcoreError(f"{key}: {exc}") from None
    if parsed is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    kind, index = parsed
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise QkcoreError(f"{key}: {device_map!r} asks for an Apple GPU (MPS), which this machine lacks; use 'cpu' or 'auto'")
        return torch.device("mps")
    if not torch.cuda.is_available():
        reason = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA device is visible (see nvidia-smi and CUDA_VISIBLE_DEVICES)"
        )
        raise QkcoreError(f"{key}: {device_map!r} asks for CUDA, but {reason}; use 'cpu' or 'auto'")
    if index is None:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if int(index) >= count:
        raise QkcoreError(f"{key}: {device_map!r} asks for CUDA device {index}, but only {count} are visible (0..{count - 1})")
    return torch.device("cuda", int(index))


@dataclass(frozen=True)
class Precision:
    """The dtype the weights are loaded in, and why it differs from ``model.dtype`` if it does."""

    requested: str  # model.dtype, canonical ("float16", "bfloat16", "float32", "auto")
    dtype: torch.dtype | None  # None: the checkpoint's own, not known before loading
    note: str | None = None  # a sentence for the dataset card (a cast, a CPU caveat)

    @property
    def name(self) -> str:
        """``float32``-style name of :attr:`dtype` (``auto`` when it is the checkpoint's own)."""
        return "auto" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def card(self) -> dict[str, Any]:
        """JSON-able summary for the dataset card."""
        return {"requested_dtype": self.requested, "effective_dtype": self.name, "note": self.note}


def _checkpoint_dtype(config: Any) -> torch.dtype | None:
    value = getattr(config, "dtype", None) if config is not None else None
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _precision(requested: torch.dtype | str, device: torch.device, model_cfg: ModelConfig, config: Any) -> Precision:
    name = "auto" if requested == "auto" else str(requested).removeprefix("torch.")
    dtype: torch.dtype | None
    notes = []
    if requested != "auto":
        dtype = requested  # type: ignore[assignment]
    elif model_cfg.gguf_file:
        dtype = torch.float32
        notes.append("model.dtype auto: the GGUF blocks are dequantized to float32")
    elif model_cfg.config is not None:
        dtype = torch.get_default_dtype()  # random weights have no checkpoint dtype
    else:
        dtype = _checkpoint_dtype(config)
    if device.type == "mps" and dtype == torch.bfloat16:
        # As the original sniff-qk does: bfloat16 is not supported on every MPS backend.
        dtype = torch.float16
        notes.append("bfloat16 was requested; the model ran in float16 on MPS, so values differ from a bfloat16 run")
    if device.type == "cpu" and dtype == torch.float16:
        notes.append("float16 on a CPU: slow, and CPU float16 kernels differ from GPU ones; float32 is the CPU choice")
    return Precision(name, dtype, "; ".join(notes) or None)


def precision(model_cfg: ModelConfig, device: torch.device, config: Any = None) -> Precision:
    """The dtype ``model.dtype`` resolves to on ``device`` (``config``: the checkpoint's, for ``auto``)."""
    return _precision(resolve_dtype(model_cfg.dtype), device, model_cfg, config)


# --------------------------------------------------------------------------- architecture


def _model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return list(CONFIG_MAPPING.keys())


def unknown_model_type(model_type: str, key: str) -> QkcoreError:
    """The error for a ``model_type`` transformers does not know, naming the closest known ones."""
    import transformers

    known = _model_types()
    close = difflib.get_close_matches(model_type, known, n=3, cutoff=0.6)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return QkcoreError(
        f"{key}: transformers {transformers.__version__} has no model_type '{model_type}'{hint} "
        f"({len(known)} types are known; a newer transformers or trust_remote_code may be needed)"
    )


def _rope_types(parameters: Any) -> list[str]:
    """The ``rope_type`` values of a ``rope_parameters`` dict (flat, or one dict per layer type)."""
    if not isinstance(parameters, dict):
        return []
    if "rope_type" in parameters:
        return [str(parameters["rope_type"])]
    return [str(v["rope_type"]) for v in parameters.values() if isinstance(v, dict) and "rope_type" in v]


def _check_rope_types(config: Any) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    known = ["default", *ROPE_INIT_FUNCTIONS]
    for rope_type in _rope_types(getattr(config, "rope_parameters", None)):
        if rope_type not in known:
            close = difflib.get_close_matches(rope_type, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise QkcoreError(
                f"model.config_overrides: unknown rope_type '{rope_type}'{hint}; known: {', '.join(known)}"
            )


def apply_config_overrides(config: Any, overrides: dict[str, Any] | None) -> None:
    """Set ``model.config_overrides`` on the (text) config.

    ``rope_scaling`` is the key older configs use; transformers 5 keeps RoPE
    settings in ``rope_parameters``. Either spelling is merged into the
    installed transformers' form, keeping ``rope_theta``.
    """
    if not overrides:
        return
    targets = [config]
    text_config = config.get_text_config()
    if text_config is not config:
        targets.append(text_config)
    for key, value in overrides.items():
        for target in targets:
            if key in ("rope_scaling", "rope_parameters") and hasattr(target, "rope_parameters"):
                merged = dict(getattr(target, "rope_parameters", None) or {})
                merged.update(value or {})
                if "type" in merged and "rope_type" not in merged:
                    merged["rope_type"] = merged.pop("type")
                target.rope_parameters = merged
            elif target is config or hasattr(target, key):
                setattr(target, key, value)
    # transformers only logs an unknown rope_type here and fails later with a KeyError.
    _check_rope_types(text_config)
    if hasattr(text_config, "validate_rope"):
        try:
            text_config.validate_rope()
        except Exception as exc:  # transformers raises several types here
            raise QkcoreError(f"model.config_overrides: invalid RoPE settings: {exc}") from exc


def architecture_config(spec: str | dict[str, Any]) -> Any:
    """Build a transformers config from a ``config.json`` path or an inline dict."""
    from transformers import AutoConfig

    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if not path.is_file():
            raise QkcoreError(f"model.config: no such file: {path}")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise QkcoreError(f"model.config: {path} is not valid JSON: {exc}") from exc
    spec = dict(spec)
    model_type = spec.pop("model_type", None)
    if not model_type:
        raise QkcoreError("model.config: the architecture config has no 'model_type'")
    if model_type not in _model_types():
        raise unknown_model_type(model_type, "model.config")
    try:
        return AutoConfig.for_model(model_type, **spec)
    except (ValueError, KeyError) as exc:
        raise QkcoreError(f"model.config: cannot build a '{model_type}' config: {exc}") from exc


def _gguf_architecture(model_cfg: ModelConfig) -> Any:
    """The config stored in a GGUF file, read by transformers."""
    from transformers import AutoConfig

    require_gguf_support()
    location = locate_gguf(model_cfg)
    revision = None if location.local else pinned_revision(location.folder, model_cfg.revision)
    try:
        return AutoConfig.from_pretrained(location.folder, gguf_file=location.file, revision=revision)
    except (OSError, ValueError, KeyError) as exc:
        raise load_error(location, "config", exc) from exc


def load_architecture(model_cfg: ModelConfig) -> Any:
    """The model's config (with ``config_overrides`` applied), without loading weights.

    From ``model.config`` (an architecture to build with random weights), from
    ``model.gguf_file``, or from ``model.name`` at ``model.revision`` (hub id or
    local directory).
    """
    from transformers import AutoConfig

    if model_cfg.config is not None:
        config = architecture_config(model_cfg.config)
    elif model_cfg.gguf_file:
        config = _gguf_architecture(model_cfg)
    else:
        name = model_cfg.name
        local = source_kind(name, "model.name") == "local"
        if not local:
            check_hub_repo(name, model_cfg.revision, "model.name")
        if local and not (Path(os.path.expanduser(name)) / "config.json").is_file():
            raise QkcoreError(f"model.name: the model directory {Path(name).resolve()} has no config.json")
        revision = model_cfg.revision if local else pinned_revision(name, model_cfg.revision)
        try:
            config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=model_cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            model_type = _local_model_type(name) if local else None
            if model_type is not None and model_type not in _model_types() and not model_cfg.trust_remote_code:
                raise unknown_model_type(model_type, "model.name") from exc
            raise QkcoreError(f"model.name: cannot load config of '{name}': {exc}") from exc
    apply_config_overrides(config, model_cfg.config_overrides)
    return config


def _local_model_type(folder: str) -> str | None:
    try:
        return json.loads((Path(os.path.expanduser(folder)) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------- weights


def local_weight_files(folder: Path) -> list[str]:
    """The weight files ``from_pretrained`` would read from ``folder`` (names relative to it).

    Raises if there are none, if an index names a missing shard, or if a
    safetensors file is truncated or corrupt (its header does not cover the file).
    """
    names = {p.name for p in folder.iterdir() if p.is_file()}
    for single, index in (_SAFETENSORS, _TORCH_BIN):
        if index in names:
            weight_map = json.loads((folder / index).read_text(encoding="utf-8")).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if s not in names]
            if missing:
                raise QkcoreError(f"model.name: {folder / index} lists shard(s) missing from the directory: {', '.join(missing[:5])}")
            files = [index, *shards]
            break
        if single in names:
            files = [single]
            break
    else:
        present = ", ".join(sorted(names)[:10]) or "nothing"
        raise QkcoreError(
            f"model.name: no weights in {folder} (expected model.safetensors, a sharded "
            f"model.safetensors.index.json or pytorch_model.bin; found {present})"
        )
    for name in files:
        if name.endswith(".safetensors"):
            _check_safetensors(folder / name)
    return files


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass  # opening parses the header and checks it covers the whole file
    except Exception as exc:  # SafetensorError, OSError
        raise QkcoreError(f"model.name: {path} is truncated or corrupt ({exc}); copy or download it again") from exc


def load_model(
    model_cfg: ModelConfig, config: Any, model_class: Any, dtype: Any, device: torch.device,
    extra: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """Return ``model_class`` for ``config`` in eval mode on ``device``.

    ``extra``: more ``from_pretrained`` arguments for a checkpoint (tensor parallelism's
    ``distributed_config``, see :func:`qkcore.tensor_parallel.group_mesh`).

    ``model.config`` set: random weights seeded by ``init_seed``, never
    downloaded. ``model.gguf_file`` set: the GGUF's weights, dequantized.
    Otherwise the weights of ``model.name`` at ``model.revision``. ``dtype`` is
    the requested dtype; on MPS bfloat16 becomes float16 (see :func:`precision`).
    """
    attn = model_cfg.attn_implementation or "sdpa"
    chosen = _precision(dtype, device, model_cfg, config)
    if chosen.note:
        log.warning("model precision", dtype=chosen.name, note=chosen.note)
    torch_dtype = chosen.dtype
    if model_cfg.config is not None:
        torch.manual_seed(model_cfg.init_seed)
        # Auto classes build with from_config, concrete model classes with _from_config.
        build = getattr(model_class, "from_config", None) or model_class._from_config
        try:
            # Initialise directly on the device: an 8B random model built on the CPU
            # first takes minutes and twice the host memory.
            with torch.device(device):
                model = build(config, attn_implementation=attn, dtype=torch_dtype)
        except ValueError as exc:
            raise QkcoreError(f"model.config: cannot build '{config.model_type}' with {model_class.__name__}: {exc}") from exc
    elif model_cfg.gguf_file:
        model = _load_gguf_model(model_cfg, config, model_class, torch_dtype, attn)
    else:
        name = model_cfg.name
        local = source_kind(name, "model.name") == "local"
        if local:
            local_weight_files(Path(os.path.expanduser(name)))
        try:
            model = model_class.from_pretrained(
                name,
                config=config,
                revision=model_cfg.revision if local else pinned_revision(name, model_cfg.revision),
                dtype=torch_dtype if torch_dtype is not None else "auto",
                attn_implementation=attn,
                trust_remote_code=model_cfg.trust_remote_code,
                **(extra or {}),  # issue 19
            )
        except Exception as exc:
            if type(exc).__name__ == "SafetensorError":  # a cached Hub file cut short
                raise QkcoreError(f"model.name: the weights of '{name}' are truncated or corrupt: {exc}") from exc
            if isinstance(exc, OSError):
                raise QkcoreError(f"model.name: cannot load the weights of '{name}': {exc}") from exc
            raise
    return model.to(device).eval()


def _load_gguf_model(model_cfg: ModelConfig, config: Any, model_class: Any, dtype: torch.dtype | None, attn: str) -> Any:
    require_gguf_support()
    location = locate_gguf(model_cfg)
    extra: dict[str, Any] = {}
    try:
        from transformers import GgufConfig

        # Always a dense model: capture reads q_proj/k_proj outputs of plain linear layers.
        extra["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers dequantize every GGUF anyway
        pass
    try:
        with library_bars_off():
            return model_class.from_pretrained(
                location.folder,
                gguf_file=location.file,
                config=config,
                revision=None if location.local else pinned_revision(location.folder, model_cfg.revision),
                dtype=dtype or torch.float32,
                attn_implementation=attn,
                **extra,
            )
    except (OSError, ValueError, KeyError) as exc:
        raise load_error(location, "weights", exc) from exc


# --------------------------------------------------------------------------- identity


def _config_sha256(config: Any) -> str:
    """sha256 of the config's settings (labels such as the transformers version left out)."""
    settings = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_LABELS}
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_identity(model_cfg: ModelConfig, config: Any, hash_cache: dict[str, str] | None = None) -> dict[str, Any]:
    """What pins the weights a run computes with, as a JSON-able dict.

    It changes whenever the weights could differ and not otherwise:

    * random (``model.config``): seed, architecture config hash, dtype, device type
      (CPU and CUDA generators draw different numbers), torch and transformers
      versions (their initialisers may change between releases);
    * GGUF: the file's name and sha256, its quantisation, and the float type its
      blocks are dequantized to;
    * Hub: the repo and the commit ``model.revision`` resolves to;
    * local directory: the sha256 of the weight files and ``config.json``
      (and of ``*.py`` with ``trust_remote_code``).

    ``config`` is the transformers config :func:`load_architecture` returned.
    ``hash_cache`` (see :func:`~qkcore.sources.locations.file_sha256`) spares
    rehashing unchanged files. Raises if a Hub commit cannot be resolved.
    """
    if model_cfg.config is not None:
        import transformers

        device = resolve_device(model_cfg.device_map)
        return {
            "source": "random",
            "init_seed": model_cfg.init_seed,
            "config_sha256": _config_sha256(config),
            "dtype": precision(model_cfg, device, config).name,
            "device": device.type,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
    if model_cfg.gguf_file:
        path = gguf_path(locate_gguf(model_cfg), model_cfg.revision)
        metadata = gguf_metadata(path, hash_cache)
        return {
            "source": "gguf",
            "file": path.name,
            "sha256": file_sha256(path, hash_cache),
            "quantization": metadata.quantization,
            "tensor_types": metadata.tensor_types,
            "dequantized_to": precision(model_cfg, resolve_device(model_cfg.device_map), config).name,
        }
    name = model_cfg.name
    if source_kind(name, "model.name") == "hub":
        return {"source": "hub", "repo": name, "commit": hub_commit(name, model_cfg.revision, "model.revision")}
    folder = Path(os.path.expanduser(name))
    files = [*local_weight_files(folder), "config.json"]
    if model_cfg.trust_remote_code:
        files += [p.name for p in folder.glob("*.py")]
    return {"source": "local", "files": files_sha256(folder, files, hash_cache)}
