"""The ``fresh`` / ``resume`` action: load the weights, capture, merge the ranks, finish, publish, push.

Under torchrun every rank captures its own batches (:func:`~qkcore.stages.capture.capture_unit`
into its own staging); rank 0 merges them (:mod:`qkcore.stages.merge`) and carries on
alone. A one-process run captures the whole run into the root's staging.
"""

from __future__ import annotations

import shutil

import structlog

from qkcore import tensor_parallel
from qkcore.actions.context import RunContext
from qkcore.errors import QkcoreError
from qkcore.estimate import estimate_disk
from qkcore.root_policy import Decision
from qkcore.run_state import RunState, SniffResult
from qkcore.stages.capture import Sniffer, capture_unit
from qkcore.stages.finish import finish
from qkcore.stages.load import RunInputs, load_weights
from qkcore.stages.merge import merge_ranks
from qkcore.writer import read_journal

log = structlog.get_logger(__name__)


def capture(ctx: RunContext, inputs: RunInputs, decision: Decision, merged: bool) -> SniffResult:
    """Capture the run (or resume it); ``merged``: rank 0 merged the torchrun ranks before a crash."""
    ranks, root = ctx.ranks, ctx.root
    sniffer = Sniffer(inputs, load_weights(inputs, ranks), ranks)
    ctx.mark("loaded")
    if ranks.is_main:
        check_disk(ctx, sniffer)
    fresh = RunState(inputs.identity, ranks.world_size if ctx.shards is None else ctx.shards.count, decision.replace)
    if ctx.shards is not None:  # a sweep's shards captured the documents: merge them like torchrun ranks
        shards = ctx.shards.count
        writer, state = merge_ranks(
            ctx.cfg, root.staging_dir, [root.rank_staging(shard) for shard in range(shards)], root.ranks_dir,
            [] if merged else shard_states(ctx, shards), fresh,
        )
    elif ranks.distributed:
        state = fresh
        if not merged:  # every rank captures its batches into its own staging
            rank_writer, state = capture_unit(sniffer, root.rank_staging(ranks.rank), fresh, whole_run=False)
            rank_writer.abort()  # the state is committed; release the writer's buffers
        shares = ranks.gather(state.to_json())
        ranks.barrier()
        if not ranks.is_main:
            return ctx.share_result(state, "captured")
        writer, state = merge_ranks(
            ctx.cfg, root.staging_dir, [root.rank_staging(rank) for rank in range(ranks.world_size)], root.ranks_dir,
            tensor_parallel.group_leaders([RunState.from_json(share) for share in shares], ranks), fresh,  # issue 19
        )
    else:
        writer, state = capture_unit(sniffer, root.staging_dir, fresh, whole_run=True, on_commit=ctx.on_commit)
    try:
        if state.phase == "captured":
            state = finish(sniffer, writer, state, root.final_dir)
    except BaseException:
        writer.abort()
        raise
    record = ctx.publish_and_push(state, writer)
    return ctx.result(record, "captured")


def shard_states(ctx: RunContext, shards: int) -> list[RunState]:
    """Every shard's committed state (brought to this machine first), each captured to the end, or one line naming the first that is not."""
    states = []
    for shard in range(shards):
        ctx.root.load_staged(shard)
        journal = read_journal(ctx.root.rank_staging(shard))
        try:
            state = None if journal is None else RunState.from_json(journal.get("state"))
        except ValueError as exc:
            raise QkcoreError(f"{ctx.root.rank_staging(shard)}: the journal's state is unreadable ({exc}); "
                              "rerun the sweep with --restart to discard the staged progress") from None
        if state is None or state.phase != "captured":
            raise QkcoreError(
                f"{ctx.root.location}: shard {shard} of {shards} has not finished capturing "
                f"({'nothing committed' if state is None else f'{state.documents} documents committed'}); "
                "rerun the same `qkcore sweep --shards` command, it resumes the shard from its last commit"
            )
        states.append(state)
    return states


def check_disk(ctx: RunContext, sniffer: Sniffer) -> None:
    """Warn when the root's free disk is below the estimate of ``qkcore plan`` for documents at ``tokenizer.max_length``."""
    cfg = sniffer.cfg
    documents = sniffer.inputs.documents.documents or cfg.dataset.max_samples or 0
    needed = estimate_disk(
        sniffer.plan, sniffer.sampler, {cfg.tokenizer.max_length: documents}, documents=documents,
        batch_size=cfg.inference.batch_size, vector_dtype=sniffer.vector_dtype,
    ).needed_bytes
    free = shutil.disk_usage(ctx.root.work_dir).free
    if needed > free:
        log.warning("the data root may not have enough free disk for this run (estimate for documents at "
                    "tokenizer.max_length; see `qkcore plan`)", needed_gb=round(needed / 1e9, 2), free_gb=round(free / 1e9, 2))
