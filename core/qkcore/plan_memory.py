"""``qkcore plan``: the memory a run needs on each device, and the smallest tensor-parallel size that fits.

Per device, for ``inference.tensor_parallel_size`` = K (:func:`device_memory`):

* **weights**: every parameter of the model built on the ``meta`` device, in the run's
  dtype; those the model's TP plan splits (``q/k/v/o_proj``, the MLP, embeddings and
  head where the plan names them) count 1/K, the rest (norms) whole.
* **activations**: the largest forward step of one decoder layer for a batch of
  ``inference.batch_size`` documents at ``tokenizer.max_length`` (inference: no cache,
  nothing kept for a backward pass): the residual stream, the layer's Q/K/V (1/K of
  the heads), and the larger of the attention step and the MLP step. Attention holds
  the (batch, heads/K, T, T) scores only in ``eager`` (the matmul's output, then the
  float32 softmax and its cast back), plus its float mask (batch, 1, T, T); ``sdpa``
  and flash kernels keep O(T) per head (``sdpa`` still gets a boolean mask when the
  batch is padded, i.e. batch_size > 1).
* **qkcore buffers**: the kept rows of every captured (layer, kind) are gathered on
  the device during the forward and copied out once after it, so all of them are
  held at the end of the forward: expected kept rows at ``tokenizer.max_length`` x
  the captured heads on the busiest rank x head_dim, plus the row indices. On the CPU
  (device = host) the host copy doubles them.

Checked against the measured peak of tiny models on the CPU (``tests/integration/test_plan_memory.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pluggy
import torch

from qkcore.config import ConfigError, SniffConfig, resolve_dtype
from qkcore.stages.plan import build_sampler, plan_capture
from qkcore.plugins import installed_summary, make_plugin_manager
from qkcore.samplers import Sampler

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``80GiB``, ``80 GB``, ``141e9``... in bytes (GiB/MiB binary, GB/MB decimal)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"--gpu-memory: {text!r} is not a size (e.g. 80GiB, 141GB)")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes one device holds at the peak of a run with tensor-parallel size ``tensor_parallel_size``."""

    tensor_parallel_size: int
    weights: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        return self.weights + self.activations + self.buffers


@dataclass(frozen=True)
class MemoryPlan:
    """Per-device memory for each usable K, and the smallest that fits ``device_bytes`` (if given)."""

    source: str
    max_length: int
    batch_size: int
    attn_implementation: str
    configured: int  # inference.tensor_parallel_size
    estimates: list[DeviceMemory]  # one per usable K, ascending
    device_bytes: int | None = None
    note: str | None = None  # why some K are not usable

    def fitting(self) -> DeviceMemory | None:
        """The smallest K whose devices hold the run, if any."""
        if self.device_bytes is None:
            return None
        return next((e for e in self.estimates if e.total <= self.device_bytes), None)


def _dtype_bytes(cfg: SniffConfig, config: Any) -> int:
    dtype = resolve_dtype(cfg.model.dtype)
    if not isinstance(dtype, torch.dtype):  # "auto": the checkpoint's own dtype
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, str(dtype).removeprefix("torch."), torch.float32) if not isinstance(dtype, torch.dtype) else dtype
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _tp_patterns(model: torch.nn.Module) -> list[re.Pattern[str]]:
    plan = dict(getattr(model, "tp_plan", None) or {})
    return [re.compile(re.escape(name).replace(r"\*", r"\d+") + r"(\..*)?") for name in plan]


def weight_bytes(model: torch.nn.Module, dtype_bytes: int, k: int) -> float:
    """Parameter bytes on one device: split ones by ``k``, the rest whole (tied weights once)."""
    patterns = _tp_patterns(model)
    total = 0.0
    for name, parameter in model.named_parameters():
        split = k > 1 and any(p.fullmatch(name) for p in patterns)
        total += parameter.numel() * dtype_bytes / (k if split else 1)
    return total


def device_memory(
    model: torch.nn.Module, cfg: SniffConfig, heads: dict[tuple[int, str], list[int]], sampler: Sampler, k: int
) -> DeviceMemory:
    """The estimate for one K (see the module docstring)."""
    config = model.config.get_text_config()
    e = _dtype_bytes(cfg, model.config)
    b, t = cfg.inference.batch_size, cfg.tokenizer.max_length
    hidden = int(config.hidden_size)
    n_q = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_q)
    d = int(getattr(config, "head_dim", None) or hidden // n_q)
    inter = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    attn = cfg.model.attn_implementation or "sdpa"
    tokens = b * t
    residual = 2 * tokens * hidden * e  # the residual stream and the normed input of the step
    qkv = tokens * d * (2 * n_q + 2 * n_kv) * e / k  # projections, then rotated Q/K
    if attn == "eager":
        # scores (model dtype), their float32 softmax and its cast back, and K/V repeated to every query head
        scores = b * (n_q / k) * t * t * (e + 4)
        attention = scores + 2 * tokens * (n_q / k) * d * e + b * t * t * e  # + the float (batch, 1, T, T) mask
    else:
        mask = b * t * t if (attn == "sdpa" and b > 1) else 0  # boolean mask only when the batch is padded
        attention = 2 * tokens * (n_q / k) * d * e + mask
    mlp = 3 * tokens * inter * e / k  # gate, up, and their product
    activations = residual + max(qkv + attention, mlp)
    buffers = _buffer_bytes(heads, sampler, t, b, d, e, k, n_q, n_kv)
    if str(cfg.model.device_map).strip().lower() == "cpu":  # the host copy after the forward is the same memory
        buffers *= 2
    return DeviceMemory(k, weight_bytes(model, e, k), activations, buffers)


def _buffer_bytes(
    heads: dict[tuple[int, str], list[int]], sampler: Sampler, t: int, b: int, d: int, e: int, k: int, n_q: int, n_kv: int
) -> float:
    """Kept rows of every captured (layer, kind) on the busiest rank, held until the forward ends."""
    from qkcore.estimate import expected_rows

    rows = expected_rows(sampler, {t: b})
    total = 0.0
    for (_, kind), captured in heads.items():
        per_rank = (n_q if kind == "q" else n_kv) // k
        busiest = max(sum(1 for h in captured if h // per_rank == r) for r in range(k))
        total += rows * (busiest * d * e + 16)  # vectors, and the int64 batch/position indices
    return total


def memory_plan(cfg: SniffConfig, pm: pluggy.PluginManager | None = None, device_bytes: int | None = None) -> MemoryPlan:
    """Per-device memory for every K the model allows (divisors of its key/value heads with a TP plan)."""
    from qkcore.estimate import build_meta_model

    pm = pm or make_plugin_manager()
    model, family = build_meta_model(cfg, pm)
    sampler = build_sampler(pm, cfg)
    heads = plan_capture(model, family, cfg, installed_summary(pm)).heads
    config = model.config.get_text_config()
    n_q = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_q)
    note = None
    sizes = [k for k in range(1, n_kv + 1) if n_kv % k == 0 and n_q % k == 0]
    if not (getattr(config, "base_model_tp_plan", None) or getattr(model.config, "base_model_tp_plan", None)):
        sizes, note = [1], f"model_type '{family.model_type}' has no tensor-parallel plan: one process only"
    estimates = [device_memory(model, cfg, heads, sampler, k) for k in sizes]
    return MemoryPlan(
        source=str(cfg.source or "<config>"), max_length=cfg.tokenizer.max_length, batch_size=cfg.inference.batch_size,
        attn_implementation=cfg.model.attn_implementation or "sdpa",
        configured=int(getattr(cfg.inference, "tensor_parallel_size", 1) or 1),
        estimates=estimates, device_bytes=device_bytes, note=note,
    )


def _gib(value: float) -> str:
    return f"{value / 2**30:,.2f} GiB" if value >= 2**26 else f"{value / 2**20:,.1f} MiB"


def command(source: str, k: int) -> str:
    """The command that runs ``source`` with tensor-parallel size ``k`` (one group)."""
    if k == 1:
        return f"qkcore sniff --config {source}"
    return (f"torchrun --nproc-per-node {k} -m qkcore sniff --config {source} "
            f"--set inference.tensor_parallel_size={k}")


def format_memory(plan: MemoryPlan) -> str:
    """The plan's memory lines for a person."""
    lines = [
        f"memory per device at tokenizer.max_length {plan.max_length:,} (batch {plan.batch_size}, "
        f"attention {plan.attn_implementation}); an estimate:",
        f"  {'K':>3}  {'weights':>12}  {'activations':>12}  {'qkcore buffers':>14}  {'total':>12}",
    ]
    for e in plan.estimates:
        mark = "  <- configured" if e.tensor_parallel_size == plan.configured else ""
        lines.append(f"  {e.tensor_parallel_size:>3}  {_gib(e.weights):>12}  {_gib(e.activations):>12}  "
                     f"{_gib(e.buffers):>14}  {_gib(e.total):>12}{mark}")
    if plan.note:
        lines.append(f"  {plan.note}")
    if plan.device_bytes is not None:
        fit = plan.fitting()
        if fit is None:
            largest = plan.estimates[-1]
            lines.append(
                f"no tensor-parallel size fits {_gib(plan.device_bytes)} per device (K={largest.tensor_parallel_size} "
                f"needs {_gib(largest.total)}): lower tokenizer.max_length or inference.batch_size, sample fewer rows "
                "or heads, or use attn_implementation sdpa"
            )
        else:
            lines.append(f"smallest K that fits {_gib(plan.device_bytes)} per device: {fit.tensor_parallel_size} "
                         f"({_gib(fit.total)} each); run:")
            lines.append(f"  {command(plan.source, fit.tensor_parallel_size)}")
            if fit.tensor_parallel_size > 1:
                lines.append(f"  (with M x {fit.tensor_parallel_size} processes, M groups split the documents)")
    return "\n".join(lines)

