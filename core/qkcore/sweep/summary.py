"""The sweep's final table and its exit code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from qkcore.sweep.runs import Run

RunStatus = Literal["done", "failed", "error"]  # failed: the user must fix it (exit 2); error: anything else (exit 1)


@dataclass(frozen=True)
class RunReport:
    """How one run of the sweep ended."""

    run: Run
    status: RunStatus
    action: str = ""  # captured / already complete / pulled / published
    rows: int = 0
    seconds: float = 0.0
    message: str = ""


def exit_code(reports: Sequence[RunReport]) -> int:
    """0 when every run is complete; 2 when a run failed for a reason the user must fix; 1 otherwise."""
    if all(r.status == "done" for r in reports):
        return 0
    return 2 if any(r.status == "failed" for r in reports) else 1


def table(reports: Sequence[RunReport]) -> str:
    """One row per run: run, model, rows, wall time, status, data root (or Hub branch); then each failure's line."""
    header = ("run", "model", "rows", "wall", "status", "data root / Hub branch")
    rows = [
        (r.run.name, r.run.model, f"{r.rows:,}" if r.status == "done" else "-", f"{r.seconds:.1f}s",
         r.action if r.status == "done" else r.status, r.run.target)
        for r in reports
    ]
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip() for cells in [header, *rows]]
    failures = [f"{r.run.name}: {r.status}: {r.message}" for r in reports if r.status != "done"]
    done = sum(r.status == "done" for r in reports)
    return "\n".join([*lines, "", f"{done} of {len(reports)} runs complete", *failures])
