#!/usr/bin/env python
"""What ``qkcore sweep`` itself costs: the same configs swept on a local Ray against ``qkcore sniff`` one after another.

Writes ``--runs`` tiny configs (random Llama weights, the offline byte tokenizer,
``--documents`` documents each) into a temporary folder, then, on fresh data roots:

* **by hand**: ``qkcore sniff --config C`` for each config, one after the other (each a new process);
* **sweep**: one ``qkcore sweep C1 C2 ...`` (Ray started in the command's process, with every CPU);
* **sweep, again**: the same sweep once every run is complete (only the data root's check runs).

Prints each wall time, the ratio sweep / by hand, the machine and the versions. A ratio
under 1 means the sweep's parallelism (one task per CPU) paid for its start; the
"again" line is the sweep's fixed cost with no capture at all.

    python benchmarks/sweep_overhead.py                 # 3 runs, ~1-2 min on a 2-core CPU
    python benchmarks/sweep_overhead.py --runs 6 --documents 40
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _configs(folder: Path, runs: int, documents: int) -> list[Path]:
    from qkcore.testing import TINY_LLAMA, write_run_config

    texts = [(f"doc{i}", " ".join(f"w{i}x{j}" for j in range(40 + i % 17))) for i in range(documents)]
    configs = []
    for n in range(runs):
        (folder / f"run{n}").mkdir()
        configs.append(write_run_config(folder / f"run{n}", TINY_LLAMA, texts=texts,
                                        capture={"head_sampling": {"count": 4, "seed": n}}))
    return configs


def _timed(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="configs in the sweep (default 3)")
    parser.add_argument("--documents", type=int, default=20, help="documents per run (default 20)")
    args = parser.parse_args()
    qkcore = [sys.executable, "-m", "qkcore"]
    with tempfile.TemporaryDirectory(prefix="qkcore-sweep-bench-") as tmp:
        configs = _configs(Path(tmp), args.runs, args.documents)
        by_hand = sum(_timed([*qkcore, "sniff", "--quiet", "--config", str(c)]) for c in configs)
        for config in configs:  # fresh roots for the sweep
            shutil.rmtree(config.parent / "out")
        sweep = _timed([*qkcore, "sweep", *map(str, configs)])
        again = _timed([*qkcore, "sweep", *map(str, configs)])

    import ray
    import torch

    import qkcore as package

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; python {platform.python_version()}, "
          f"qkcore {package.__version__}, ray {ray.__version__}, torch {torch.__version__}")
    print(f"{args.runs} runs x {args.documents} documents (tiny random Llama, CPU)")
    print(f"by hand (qkcore sniff, one after another): {by_hand:7.1f} s")
    print(f"qkcore sweep (local Ray, fresh roots):      {sweep:7.1f} s   ratio sweep / by hand = {sweep / by_hand:.2f}")
    print(f"qkcore sweep again (every run complete):   {again:7.1f} s")


if __name__ == "__main__":
    main()
