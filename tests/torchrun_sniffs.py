"""Run several ``qkcore sniff`` configs one after another in one torchrun launch (tests only).

``python -m torch.distributed.run --nproc-per-node N tests/torchrun_sniffs.py RESULTS CONFIG...``:
every rank writes its pid to ``RESULTS/pid{RANK}`` (for a kill -9), runs each config's sniff
in turn (a launch costs more than a tiny run here) and writes ``RESULTS/rank{RANK}.json``:
the exit status of each config, in order.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import qkcore.sniff
from qkcore.cli import main

if __name__ == "__main__":
    results, configs = Path(sys.argv[1]), sys.argv[2:]
    rank = os.environ.get("RANK", "0")
    results.mkdir(parents=True, exist_ok=True)
    (results / f"pid{rank}").write_text(str(os.getpid()))
    # One process group for the whole launch: torchrun's store does not take a second
    # rendezvous in the same process, so the runs share the group (torchrun ends it).
    qkcore.sniff.shutdown = lambda ranks: None
    codes = [main(["sniff", "--config", config]) for config in configs]
    (results / f"rank{rank}.json").write_text(json.dumps(codes))
