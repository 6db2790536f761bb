"""Stage 3 of a torchrun run: rank 0 merges every rank's committed parts into one staging.

(The final files are written from the merged parts by the finish stage; a one-process
run has nothing to merge.)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from qkcore.config import SniffConfig
from qkcore.fsutil import remove_tree
from qkcore.run_state import RunState
from qkcore.stages.capture import open_writer, require_tokens, resumed_state
from qkcore.writer import DatasetWriter


def merge_ranks(
    cfg: SniffConfig, staging: Path, rank_stagings: Sequence[Path], ranks_dir: Path, shares: Sequence[RunState],
    fresh: RunState,
) -> tuple[DatasetWriter, RunState]:
    """Adopt every rank's committed parts into one writer on ``staging``; committed before anything else.

    ``shares`` are the ranks' committed states (phase ``captured``); the merged state
    sums them. A merge that was committed before a crash is resumed as it is.
    """
    writer = open_writer(cfg, staging, fresh.run_key)
    resumed = resumed_state(writer)
    if resumed is not None:  # merged before a crash: the ranks' copies are no longer needed
        remove_tree(ranks_dir)
        return writer, resumed
    for rank_staging in rank_stagings:
        writer.adopt(rank_staging)
    merged = replace(
        fresh, phase="captured",
        next_index=max(s.next_index for s in shares), documents=sum(s.documents for s in shares),
        skipped=sum(s.skipped for s in shares), tokens=sum(s.tokens for s in shares),
        example_ids=tuple(i for s in shares for i in s.example_ids),
    )
    require_tokens(merged)
    writer.commit(merged.to_json())
    remove_tree(ranks_dir)
    return writer, merged
