"""Tensor-parallel capture under torchrun (``inference.tensor_parallel_size: K``).

The ``N`` ranks of a torchrun run form ``N / K`` groups of ``K`` consecutive ranks
(rank ``r`` is member ``r % K`` of group ``r // K``). Inside a group the model is
loaded with its transformers TP plan: ``q_proj``/``k_proj`` are split column-wise, so
each rank holds whole query and key heads and the attention function it registers
sees exactly those heads, already rotated. Every rank of a group runs the same
batches; across groups documents are split batch by batch, as torchrun data
parallelism splits them (:meth:`qkcore.distributed.Ranks.owns`).

What this module decides, and where the rest of the run calls it:

* :func:`check_settings`, :func:`check_architecture`: every bad input, one error,
  before any weights load.
* :func:`group_mesh`: the 2-D (data parallel, tensor parallel) device mesh handed to
  ``from_pretrained``, so its ``tp`` axis is the rank's own group.
* :func:`layer_shard`: which global heads a rank holds, **read from the loaded
  weights** (the ``DTensor`` placement and offset of ``q_proj``/``k_proj``), never
  assumed from the rank number.
* :func:`shard_plan`: the rank's part of the one-process capture plan: each sampled
  config goes to exactly one rank of its group, query heads are checked against
  their key heads on global indices through the family's ``qkcore_key_head``, and
  the sampler keeps the one-process plan's seeds (masks do not depend on heads).
* :func:`group_start`, :func:`group_leaders`: resuming and merging a group's ranks.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterator

from qkcore.config import ConfigError
from qkcore.errors import QkcoreError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from qkcore.capture import CapturePlan
    from qkcore.config import SniffConfig
    from qkcore.distributed import Ranks
    from qkcore.layers import AttentionLayer
    from qkcore.plugins import Family

KEY = "inference.tensor_parallel_size"


def size_of(cfg: SniffConfig) -> int:
    """``K`` of ``cfg`` (1: no tensor parallelism)."""
    return int(getattr(cfg.inference, "tensor_parallel_size", 1) or 1)


# --------------------------------------------------------------------------- checks (before any weights load)


def check_settings(cfg: SniffConfig, world_size: int) -> None:
    """Refuse a ``K`` this torchrun run cannot use, or settings that cannot go with it (no I/O).

    ``world_size``: torchrun's ``WORLD_SIZE`` (1 outside torchrun). Every rank reaches
    the same verdict, so no rank is left waiting for one that stopped.
    """
    k = size_of(cfg)
    where = cfg.source or "<config>"
    if k <= 1:
        return
    if world_size <= 1:
        raise ConfigError(
            f"{where}: {KEY}: {k} needs {k} processes per group under torchrun: run "
            f"`torchrun --nproc-per-node {k} -m qkcore sniff --config {cfg.source or 'FILE'}` (or a multiple of {k})"
        )
    if world_size % k:
        nearest = " or ".join(str(n) for n in sorted({k * max(1, world_size // k), k * (world_size // k + 1)}))
        raise ConfigError(
            f"{where}: {KEY}: {k} does not divide the {world_size} torchrun processes: use --nproc-per-node "
            f"{nearest} (a multiple of {k}), or a tensor_parallel_size that divides {world_size}"
        )
    model = cfg.model
    if model.config is not None:
        raise ConfigError(
            f"{where}: {KEY}: {k} loads a checkpoint shard by shard; model.config (random weights) has none: "
            "save the model with save_pretrained and set model.name to that folder"
        )
    if model.gguf_file:
        raise ConfigError(
            f"{where}: {KEY}: {k} cannot shard a GGUF checkpoint (model.gguf_file); use the model's safetensors "
            "checkpoint, or tensor_parallel_size: 1"
        )
    if not _own_device(model.device_map):
        raise ConfigError(
            f"{where}: model.device_map: {model.device_map!r} with {KEY}: {k}: each rank holds its shard on its "
            f"own device (cuda:LOCAL_RANK); set model.device_map to auto, cuda or cpu"
        )
    if cfg.capture.capture_pre_rope:
        raise ConfigError(
            f"{where}: capture.capture_pre_rope with {KEY}: {k} is not supported (the pre-RoPE sources are the "
            "sharded projections); capture post-RoPE, or run with tensor_parallel_size: 1"
        )


def _own_device(device_map: Any) -> bool:
    """Whether ``device_map`` lets each rank hold its shard on its own device (``cuda:LOCAL_RANK``, or the CPU).

    A device index names one rank's device only: every rank reads the same config, so
    an index is refused on every rank alike (one rank refusing alone would leave the
    others waiting for it).
    """
    if device_map is None:
        return True
    return isinstance(device_map, str) and device_map.strip().lower() in ("auto", "cuda", "cpu")


def check_architecture(cfg: SniffConfig, architecture: Any, family_name: str) -> None:
    """Refuse a model ``K`` cannot split by heads, or whose transformers config has no TP plan."""
    k = size_of(cfg)
    if k <= 1:
        return
    where = cfg.source or "<config>"
    text = architecture.get_text_config() if hasattr(architecture, "get_text_config") else architecture
    if not (getattr(text, "base_model_tp_plan", None) or getattr(architecture, "base_model_tp_plan", None)):
        raise ConfigError(
            f"{where}: {KEY}: {k}: model_type '{family_name}' has no tensor-parallel plan in its transformers "
            "config (base_model_tp_plan); run it in one process with model.device_map: auto and "
            "tensor_parallel_size: 1"
        )
    num_q = int(text.num_attention_heads)
    num_kv = int(getattr(text, "num_key_value_heads", None) or num_q)
    for name, count in (("num_key_value_heads", num_kv), ("num_attention_heads", num_q)):
        if count % k:
            divisors = [d for d in range(1, num_kv + 1) if num_kv % d == 0 and num_q % d == 0]
            raise ConfigError(
                f"{where}: {KEY}: {k} does not divide the model's {name} ({count}): each rank must hold whole "
                f"key/value heads; use one of {divisors}"
            )


def with_groups(ranks: Ranks, cfg: SniffConfig) -> Ranks:
    """``ranks`` grouped by ``K`` (checked first: see :func:`check_settings`)."""
    check_settings(cfg, ranks.world_size)
    k = size_of(cfg)
    return ranks if k <= 1 else replace(ranks, tensor_parallel_size=k)


# --------------------------------------------------------------------------- loading


@contextmanager
def group_mesh(ranks: Ranks, device: torch.device) -> Iterator[dict[str, Any]]:
    """While loading: the ``from_pretrained`` arguments of a TP load over this rank's group.

    transformers (5.x) builds its device mesh from ``DistributedConfig`` alone and
    checks that ``tp_size`` covers the whole world; a data-parallel axis there would
    also turn on FSDP. So for the load its mesh builder is replaced by one whose
    dense mesh is ``(pp=1, dp_replicate=N/K, fsdp=1, tp=K)``: the ``tp`` sub-mesh it
    shards over is exactly this rank's group of ``K`` consecutive ranks, and the
    ``DistributedConfig`` (``tp_size=K``, nothing else) applies the TP plan only.
    """
    import torch.distributed as dist

    try:
        import transformers.distributed.mixin as mixin
        from transformers.distributed import DistributedConfig
        from transformers.distributed.utils import TransformersDeviceMesh, _bind_local_device
    except ImportError as exc:  # pragma: no cover - depends on the installed transformers
        import transformers

        raise QkcoreError(
            f"{KEY}: this transformers ({transformers.__version__}) has no native tensor parallelism "
            f"(transformers.distributed): install transformers>=5.2, or use tensor_parallel_size: 1"
        ) from exc
    if not hasattr(mixin, "initialize_distributed_mesh"):  # pragma: no cover - a transformers qkcore was not built on
        raise QkcoreError(f"{KEY}: this transformers builds its device mesh in a way qkcore does not know; "
                          "use tensor_parallel_size: 1")
    k, n = ranks.tensor_parallel_size, ranks.world_size
    device_type = device.type

    def build(config: Any) -> tuple[Any, Any]:
        dense = dist.init_device_mesh(device_type, (1, n // k, 1, k), mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp"))
        expert = dist.init_device_mesh(device_type, (1, n // k, k, 1), mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"))
        return _bind_local_device(device_type, ranks.local_rank), TransformersDeviceMesh(dense, expert)

    original = mixin.initialize_distributed_mesh
    mixin.initialize_distributed_mesh = build
    try:
        yield {"distributed_config": DistributedConfig(tp_size=k, tp_plan="auto")}
    finally:
        mixin.initialize_distributed_mesh = original


# --------------------------------------------------------------------------- which heads a rank holds


@dataclass(frozen=True)
class LayerShard:
    """The global heads of one attention layer this rank holds (contiguous, as column-wise sharding splits them)."""

    query_heads: range
    key_heads: range


def _rows_held(weight: torch.Tensor, what: str) -> tuple[int, int, bool]:
    """``(first row, row count, sharded)`` of the global ``weight`` this rank holds, from its DTensor layout."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = None  # type: ignore[assignment,misc]
    if DTensor is None or not isinstance(weight, DTensor):
        return 0, int(weight.shape[0]), False
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in weight.placements:
        if not isinstance(placement, (Replicate, Shard)) or (isinstance(placement, Shard) and placement.dim != 0):
            raise QkcoreError(
                f"{what} is sharded as {weight.placements}: qkcore captures whole heads only from a column-wise "
                "(Shard(0)) or replicated projection; use tensor_parallel_size: 1"
            )
    local_shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    sharded = any(isinstance(p, Shard) for p in weight.placements)
    return int(offset[0]), int(local_shape[0]), sharded


def layer_shard(layer: AttentionLayer, tensor_parallel_size: int) -> LayerShard:
    """The global query and key heads of ``layer`` this rank holds, read from ``q_proj``/``k_proj``'s sharding.

    Refuses a split that is not along whole heads, and a projection left whole when
    ``tensor_parallel_size > 1`` (the kernel would then see every head: nothing to derive from).
    """
    module = layer.module
    heads: dict[str, range] = {}
    for kind, name, total in (("q", "q_proj", layer.num_query_heads), ("k", "k_proj", layer.num_key_value_heads)):
        projection = getattr(module, name, None)
        weight = getattr(projection, "weight", None)
        what = f"layer {layer.index} {name}"
        if weight is None:
            raise QkcoreError(f"{what}: the attention module has no {name}.weight to read its tensor-parallel shard from")
        start, rows, sharded = _rows_held(weight, what)
        if int(weight.shape[0]) != total * layer.head_dim:
            raise QkcoreError(f"{what}: {weight.shape[0]} output rows, not {total} heads x {layer.head_dim}")
        if tensor_parallel_size > 1 and not sharded:
            raise QkcoreError(
                f"{what} was loaded whole on every rank, not split by the model's tensor-parallel plan; "
                "use tensor_parallel_size: 1"
            )
        if start % layer.head_dim or rows % layer.head_dim:
            raise QkcoreError(f"{what}: rows {start}-{start + rows - 1} split a head (head_dim {layer.head_dim})")
        heads[kind] = range(start // layer.head_dim, (start + rows) // layer.head_dim)
    return LayerShard(heads["q"], heads["k"])


def shard_plan(plan: CapturePlan, family: Family, ranks: Ranks) -> CapturePlan:
    """This rank's part of the one-process ``plan`` (a collective: every rank calls it).

    Each (layer, head, kind) config goes to the lowest rank of its group that holds
    the head; every config of the plan must have one. The captured heads keep their
    global indices (config names), ``tensor_heads`` says where each sits in the
    tensor the kernel receives here, and ``cap_head`` keeps the one-process plan's
    seed of the per-document row cap, so the sampler's masks are those of one device.
    """
    k = ranks.tensor_parallel_size
    shards = {index: layer_shard(layer, k) for index, layer in plan.layers.items()}
    for index, shard in shards.items():
        layer = plan.layers[index]
        local_q, local_kv = len(shard.query_heads), len(shard.key_heads)
        if not local_kv or local_q % local_kv:
            raise QkcoreError(f"layer {index}: this rank holds {local_q} query heads over {local_kv} key heads")
        group_size = local_q // local_kv
        for position, query_head in enumerate(shard.query_heads):
            # The kernel pairs local query i with local key i // group_size (repeat_kv): its global
            # index must be the key head the family's mapping names, or rows would be mislabelled.
            kernel_key = shard.key_heads[position // group_size]
            expected = family.hooks.qkcore_key_head(
                query_head=query_head, num_query_heads=layer.num_query_heads, num_key_value_heads=layer.num_key_value_heads
            )
            if kernel_key != expected:
                raise QkcoreError(
                    f"layer {index}: query head {query_head} attends with key head {kernel_key} on this rank's shard, "
                    f"but the family's mapping says {expected}; use tensor_parallel_size: 1"
                )
    held = {(index, "q"): list(s.query_heads) for index, s in shards.items()}
    held.update({(index, "k"): list(s.key_heads) for index, s in shards.items()})
    everyone = ranks.gather({key: heads for key, heads in held.items()})
    group = range(ranks.group * k, ranks.group * k + k)
    heads: dict[tuple[int, str], list[int]] = {}
    tensor_heads: dict[tuple[int, str], list[int]] = {}
    for key, wanted in plan.heads.items():
        mine = []
        for head in wanted:
            owners = [r for r in group if head in everyone[r].get(key, ())]
            if not owners:
                layer, kind = key
                raise QkcoreError(f"layer {layer} {kind} head {head}: no rank of tensor-parallel group {ranks.group} holds it")
            if owners[0] == ranks.rank:
                mine.append(head)
        if mine:
            first = held[key][0]
            heads[key] = mine
            tensor_heads[key] = [head - first for head in mine]
    return replace(
        plan,
        heads=heads,
        tensor_heads=tensor_heads,
        cap_head={key: wanted[0] for key, wanted in plan.heads.items() if wanted},
    )


# --------------------------------------------------------------------------- resume and merge


def group_start(ranks: Ranks, capturing: bool, next_index: int) -> int | None:
    """Where this rank's group resumes: the smallest ``next_index`` of its members still capturing.

    A collective (every rank calls it). ``None`` when no member of the group is still
    capturing. The ranks of a group run their forwards together (the row-parallel
    projections sum across them), so a member that committed further than another
    (a rank killed between the members' commits) runs the missing batches again, for
    the forward only, without writing their rows twice.
    """
    if ranks.tensor_parallel_size <= 1:
        return next_index if capturing else None
    states = ranks.gather((capturing, next_index))
    k = ranks.tensor_parallel_size
    members = states[ranks.group * k: ranks.group * k + k]
    pending = [index for still, index in members if still]
    return min(pending) if pending else None


def group_leaders(states: list[Any], ranks: Ranks) -> list[Any]:
    """The first member's entry of each group from one entry per rank (rank order): a group's ranks ran the same documents."""
    return states[:: max(1, ranks.tensor_parallel_size)]


def card_fields(ranks: Ranks) -> dict[str, int]:
    """What the card records of a torchrun run's parallelism (nothing for one process: its card is unchanged)."""
    if not ranks.distributed:
        return {}
    return {"tensor_parallel_size": ranks.tensor_parallel_size, "world_size": ranks.world_size}
