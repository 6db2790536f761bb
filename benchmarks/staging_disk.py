#!/usr/bin/env python
"""Disk a run needs: bytes per row of the staging parts and of the final Parquet files.

A run spills captured rows into zstd Arrow parts under ``.qkcore-staging/``;
``close()`` writes the final Parquet files next to them before removing the
parts, so the peak disk use is parts + finals. This feeds the real
:class:`qkcore.writer.DatasetWriter` the way a run does (one chunk per
document and (layer, kind), a commit every ``--commit-every`` documents) and
prints, per head_dim and vector precision, the bytes per row of both and
their ratio. ``qkcore plan`` uses these figures (``qkcore.estimate.disk_needed_bytes``).

Vectors: float32 draws from a Gaussian with unequal scales per dimension (as
real queries and keys have), or the same rounded to bfloat16 / float16 (what a
16-bit model writes, upcast: the low mantissa bits are zero and zstd drops them). ``--replay DATA_ROOT``
feeds the rows of a finished run instead (its own head_dim and precision).

    python benchmarks/staging_disk.py
    python benchmarks/staging_disk.py --replay data/demo-smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from qkcore.layout import parse_config_name
from qkcore.writer import STAGING_DIR, CapturedChunk, DatasetWriter


def _synthetic(head_dim: int, precision: str, documents: int, rows_per_doc: int, configs: int, seed: int):
    """Chunks of one (layer, kind) with ``configs`` heads, one per document."""
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.normal(0.0, 1.0, size=head_dim)).astype(np.float32)
    for doc in range(documents):
        positions = np.sort(rng.choice(4 * rows_per_doc, size=rows_per_doc, replace=False)).astype(np.int64)
        vectors = rng.normal(size=(configs, rows_per_doc, head_dim)).astype(np.float32) * scales
        if precision != "float32":  # what a 16-bit model writes: its values, upcast
            vectors = torch.from_numpy(vectors).to(getattr(torch, precision)).float().numpy()
        yield CapturedChunk(
            layer=0, kind="q", heads=list(range(configs)),
            example_ids=np.full(rows_per_doc, 1_000_003 * doc + 17, dtype=np.int64), positions=positions,
            buckets=np.floor(np.log2(positions + 1)).astype(np.int64), vectors=vectors, sliding_window=None,
        )


def _replay(root: Path):
    """The rows of a finished run, one chunk per (config, document)."""
    for config in sorted(p for p in root.iterdir() if parse_config_name(p.name)):
        layer, head, kind = parse_config_name(config.name)
        table = pq.read_table(config / "data.parquet").to_pydict()
        ids = np.array(table["example_id"], dtype=np.int64)
        vectors = np.array(table["vector"], dtype=np.float32)
        for example in np.unique(ids):
            keep = ids == example
            yield CapturedChunk(
                layer=layer, kind=kind, heads=[head], example_ids=ids[keep],
                positions=np.array(table["position"])[keep], buckets=np.array(table["bucket"])[keep],
                vectors=vectors[keep][None], sliding_window=None,
            )


def measure(chunks, commit_every: int) -> dict[str, float]:
    """Feed ``chunks`` to a DatasetWriter; staging bytes just before close(), final bytes after."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "out"
        writer = DatasetWriter(root, run_key="measure")
        rows = 0
        for count, chunk in enumerate(chunks, 1):
            writer.add(chunk)
            rows += chunk.vectors.shape[0] * chunk.vectors.shape[1]
            if count % commit_every == 0:
                writer.commit({"chunks": count})
        writer.commit({"done": True})
        parts = sum(p.stat().st_size for p in (root / STAGING_DIR).glob("*.arrow"))
        writer.close()
        finals = sum(p.stat().st_size for p in root.glob("*/data.parquet"))
    return {"rows": rows, "part_bytes_per_row": parts / rows, "final_bytes_per_row": finals / rows,
            "parts_over_finals": parts / finals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", default="8,64,128")
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--rows-per-doc", type=int, default=512)
    parser.add_argument("--configs", type=int, default=8, help="heads per (layer, kind) chunk")
    parser.add_argument("--commit-every", type=int, default=4, help="documents between commits (each commit spills)")
    parser.add_argument("--replay", type=Path, help="measure the rows of a finished data root instead")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    results = []
    if args.replay:
        results.append({"source": str(args.replay), **measure(_replay(args.replay), args.commit_every)})
    else:
        for head_dim in (int(h) for h in args.head_dims.split(",")):
            for precision in ("float32", "bfloat16", "float16"):
                chunks = _synthetic(head_dim, precision, args.documents, args.rows_per_doc, args.configs, seed=0)
                results.append({"head_dim": head_dim, "vectors": precision, **measure(chunks, args.commit_every)})
    print(f"# python {platform.python_version()}, torch {torch.__version__}, "
          f"pyarrow {__import__('pyarrow').__version__}; commit every {args.commit_every} documents")
    print(f"{'source':<28} {'rows':>9} {'part B/row':>11} {'final B/row':>12} {'parts/finals':>13}")
    for r in results:
        label = r.get("source") or f"head_dim {r['head_dim']} {r['vectors']}"
        print(f"{label:<28} {r['rows']:>9,} {r['part_bytes_per_row']:>11.1f} {r['final_bytes_per_row']:>12.1f} "
              f"{r['parts_over_finals']:>13.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
