"""Running under ``torchrun``: one process per GPU, whole batches sharded by rank.

Batch ``b`` (documents ``b * batch_size`` to ``(b + 1) * batch_size - 1``, formed exactly
as one process forms them, see :func:`qkcore.batching.batch_of`) belongs to rank
``b % world_size``. Every batch therefore runs with the same shape and padding as in a
single process, so its rows are bit-identical; each rank stages its own parts and rank 0
merges them (the writer's sort makes the merged files byte-identical to a single-process
run), finishes, publishes and pushes. Outside torchrun this is a no-op context of one rank.

A ``qkcore sweep --shards K`` shard is the same share without a process group
(:meth:`Ranks.shard`): shard ``i`` of ``K`` owns exactly the batches torchrun rank ``i``
of ``K`` would, and its collectives are those of one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qkcore.batching import batch_of


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: issue 19: ranks per tensor-parallel group (``inference.tensor_parallel_size``); groups of
    #: consecutive ranks run the same batches, see :mod:`qkcore.tensor_parallel`.
    tensor_parallel_size: int = 1
    #: ``False`` for a sweep shard (:meth:`shard`): ``rank`` of ``world_size`` owns its batches,
    #: but there is no process group, so every collective is that of one process.
    process_group: bool = True

    @classmethod
    def shard(cls, index: int, count: int) -> Ranks:
        """Shard ``index`` of ``count`` of a ``qkcore sweep --shards`` run: torchrun rank ``index``'s batches, alone."""
        if not 0 <= index < count:
            raise ValueError(f"shard {index} is not one of {count}")
        return cls(rank=index, world_size=count, process_group=False)

    @property
    def group(self) -> int:
        """This rank's tensor-parallel group (its rank with tensor parallelism off)."""
        return self.rank // self.tensor_parallel_size

    @property
    def distributed(self) -> bool:
        """Whether this process is one of a torchrun group (collectives talk to the other ranks)."""
        return self.world_size > 1 and self.process_group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, document_index: int, batch_size: int) -> bool:
        """Whether this rank captures the document at ``document_index`` (its group owns that document's whole batch)."""
        return batch_of(document_index, batch_size) % (self.world_size // self.tensor_parallel_size) == self.group

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (picklable), on every rank."""
        if not self.distributed:
            return value
        holder = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def device(self, requested: torch.device) -> torch.device:
        """One GPU per rank: ``cuda:LOCAL_RANK`` when the run asked for CUDA."""
        if self.distributed and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def init_ranks() -> Ranks:
    """Read torchrun's environment and join the process group (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ranks


def shutdown(ranks: Ranks) -> None:
    """Leave the process group (no-op for a single process)."""
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
