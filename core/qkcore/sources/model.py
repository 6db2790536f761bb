"""Loading the model: a hub id, a local directory, or random weights from an architecture config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qkcore.errors import QkcoreError


def resolve_device(device_map: Any) -> torch.device:
    """One device for the whole model: qkcore runs on a single accelerator (or the CPU)."""
    if device_map in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, str):
        return torch.device(device_map)
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    raise QkcoreError(f"model.device_map: only a single device is supported (got {device_map!r})")


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
    try:
        return AutoConfig.for_model(model_type, **spec)
    except (ValueError, KeyError) as exc:
        raise QkcoreError(f"model.config: unsupported model type '{model_type}': {exc}") from exc


def load_architecture(model_cfg: Any) -> Any:
    """The model's config (with ``config_overrides`` applied), without loading weights.

    From ``model.config`` (an architecture to build with random weights) or from
    ``model.name`` at ``model.revision`` (hub id or local directory).
    """
    from transformers import AutoConfig

    if model_cfg.config is not None:
        config = architecture_config(model_cfg.config)
    else:
        try:
            config = AutoConfig.from_pretrained(
                model_cfg.name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise QkcoreError(f"model.name: cannot load config of '{model_cfg.name}': {exc}") from exc
    apply_config_overrides(config, model_cfg.config_overrides)
    return config


def load_model(model_cfg: Any, config: Any, model_class: Any, dtype: Any, device: torch.device) -> torch.nn.Module:
    """Return ``model_class`` for ``config`` in eval mode on ``device``.

    ``model.config`` set: random weights seeded by ``init_seed``, never
    downloaded. Otherwise the weights of ``model.name`` at ``model.revision``.
    """
    attn = model_cfg.attn_implementation or "sdpa"
    torch_dtype = None if dtype == "auto" else dtype
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
    else:
        model = model_class.from_pretrained(
            model_cfg.name,
            config=config,
            revision=model_cfg.revision,
            dtype=torch_dtype if torch_dtype is not None else "auto",
            attn_implementation=attn,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    return model.to(device).eval()
