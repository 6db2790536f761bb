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
from qkcore.estimate import estimate_disk
from qkcore.root_policy import Decision
from qkcore.run_state import RunState, SniffResult
from qkcore.stages.capture import Sniffer, capture_unit
from qkcore.stages.finish import finish
from qkcore.stages.load import RunInputs, load_weights
from qkcore.stages.merge import merge_ranks

log = structlog.get_logger(__name__)


def capture(ctx: RunContext, inputs: RunInputs, decision: Decision, merged: bool) -> SniffResult:
    """Capture the run (or resume it); ``merged``: rank 0 merged the torchrun ranks before a crash."""
    ranks, root = ctx.ranks, ctx.root
    sniffer = Sniffer(inputs, load_weights(inputs, ranks), ranks)
    ctx.mark("loaded")
    if ranks.is_main:
        check_disk(ctx, sniffer)
    fresh = RunState(inputs.identity, ranks.world_size, decision.replace)
    if ranks.distributed:
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
        writer, state = capture_unit(sniffer, root.staging_dir, fresh, whole_run=True)
    try:
        if state.phase == "captured":
            state = finish(sniffer, writer, state, root.final_dir)
    except BaseException:
        writer.abort()
        raise
    record = ctx.publish_and_push(state, writer)
    return ctx.result(record, "captured")


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
