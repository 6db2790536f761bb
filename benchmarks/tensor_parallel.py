#!/usr/bin/env python
"""Tensor-parallel capture (K = 2 under torchrun) against one process on the same documents.

A random Llama-shaped checkpoint (saved with ``save_pretrained``: TP loads shards of a
checkpoint) and a corpus are written into a scratch folder; then the same config runs

one   ``python -m qkcore sniff`` (one process), and
tp    ``torchrun --nproc-per-node K -m qkcore sniff`` with ``inference.tensor_parallel_size: K``.

Reported: the whole command's wall time (process start, loading, capture, merge,
publish) and each process's peak resident memory (``VmHWM``, read by the process itself
when its sniff returns). On the CPU this is for information (the ranks share the
machine's cores, and gloo moves the all-reduces through memory); on a machine with K
GPUs, ``--device cuda`` measures what tensor parallelism is for.

    python benchmarks/tensor_parallel.py                     # CPU, ~2-4 min on 2 cores
    python benchmarks/tensor_parallel.py --device cuda --hidden 4096 --layers 8 --length 32768 --json tp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORDS = "tide gauge sluice harbour lantern glacier stake orchard graft relay hop loom warp heddle reed".split()


def _worker(config: str, out: str) -> None:
    """Run one sniff in this process and write this rank's peak resident memory."""
    from qkcore.cli import main

    code = main(["sniff", "--config", config, "--quiet"])
    status = Path("/proc/self/status").read_text().splitlines()
    peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"code": code, "peak_rss": peak}))


def _prepare(folder: Path, args: argparse.Namespace) -> dict[str, Path]:
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(args.k, (args.hidden // 64) // 4), head_dim=64,
        vocab_size=259, max_position_embeddings=max(2048, args.length), pad_token_id=256,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "checkpoint")
    with (folder / "corpus.jsonl").open("w") as handle:
        for d in range(args.documents):
            text = " ".join(WORDS[(d * 7 + i * 3) % len(WORDS)] for i in range(args.length // 6))
            handle.write(json.dumps({"id": f"doc-{d:03d}", "text": text}) + "\n")
    configs = {}
    for name, k in (("one", 1), ("tp", args.k)):
        run = {
            "dataset": {"path": str(folder / "corpus.jsonl"), "text_column": "text", "id_column": "id"},
            "model": {"name": str(folder / "checkpoint"), "dtype": args.dtype, "device_map": args.device},
            "tokenizer": {"name": "qkcore:bytes", "max_length": args.length},
            "inference": {"batch_size": 1, "tensor_parallel_size": k},
            "capture": {"head_sampling": {"count": 8, "seed": 0}},
            "output": {"data_root": str(folder / name / "out")},
        }
        path = folder / name / "run.yaml"
        path.parent.mkdir(parents=True)
        path.write_text(yaml.safe_dump(run))
        configs[name] = path
    return configs


def _measure(command: list[str], results: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    ranks = [json.loads(p.read_text()) for p in sorted(results.glob("rank*.json"))]
    if done.returncode or not ranks or any(r["code"] for r in ranks):
        sys.exit(f"run failed:\n{done.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib_per_rank": [round(r["peak_rss"] / 2**20, 1) for r in ranks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=2, help="tensor_parallel_size (and torchrun processes)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024, help="tokenizer.max_length; documents fill it")
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu", help="model.device_map: cpu, or cuda (one GPU per rank)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    with tempfile.TemporaryDirectory(prefix="qkcore-tp-bench-") as scratch:
        folder = Path(scratch)
        configs = _prepare(folder, args)
        me = [str(Path(__file__).resolve()), "--worker"]
        one = _measure([sys.executable, *me, str(configs["one"]), str(folder / "one" / "results")],
                       folder / "one" / "results")
        tp = _measure([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.k),
                       *me, str(configs["tp"]), str(folder / "tp" / "results")], folder / "tp" / "results")
    import torch

    report = {
        "shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.hidden // 64, "length": args.length,
                  "documents": args.documents, "dtype": args.dtype, "device": args.device},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "one_process": one, f"tensor_parallel_{args.k}": tp,
        "wall_ratio_tp_over_one": round(tp["wall_s"] / one["wall_s"], 2),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
