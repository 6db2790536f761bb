"""When autocast applies, in one place: on CUDA, and only where it changes the model's dtype.

The run (:class:`~qkcore.stages.capture.Sniffer`), the identity (:mod:`qkcore.identity`)
and the disk estimate (:mod:`qkcore.estimate`, which cannot know the device and assumes
autocast may apply) all ask here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def autocast_applies(device_type: str) -> bool:
    """Whether ``inference.autocast_dtype`` can matter on this device type (CUDA only)."""
    return device_type == "cuda"


def autocast_dtype(requested: str, device_type: str, model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the forward runs under autocast, or ``None`` when autocast is off.

    Off where it changes nothing: a bf16 model under bf16 autocast would only add casts
    (and cached weight copies) to the forward.
    """
    from qkcore.config import resolve_dtype

    dtype = resolve_dtype(requested)
    if not autocast_applies(device_type) or dtype in ("auto", model_dtype):
        return None
    return dtype  # type: ignore[return-value]

