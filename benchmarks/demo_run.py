#!/usr/bin/env python
"""Whole-run cost of ``qkcore sniff`` against a bare forward over the same documents.

Both phases run in this one process with the same settings (the config's model,
dtype, device, attention, tokenizer, max_length and batch size; torch's thread
count as found):

bare   load the tokenizer and the model as ``qkcore sniff`` does, tokenise the
       documents into the same batches, and run the backbone on each
       (``torch.inference_mode()``, ``use_cache=False``); nothing is captured or written.
sniff  ``run_sniff(cfg)`` into a fresh data root, as ``qkcore sniff`` runs it: the checks,
       the data root, the run identity, the same loading plus sampler and plan (``load``
       ends when the model is loaded and planned: the result's ``seconds["loaded"]``),
       then capture, finish, publish (``run``).

The order is bare, sniff, bare; the ratio divides sniff by the mean of the two
bare runs, so a machine getting busier or quieter during the measurement shows
as a difference between the two bare runs (printed). Times are wall-clock.

    python benchmarks/demo_run.py                       # the README's demo
    python benchmarks/demo_run.py --config run.yaml --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bare(cfg: Any) -> dict[str, float]:
    """Load as qkcore does, then forward every batch with nothing attached."""
    from qkcore.batching import tokenize_batches
    from qkcore.config import resolve_dtype
    from qkcore.plugins import make_plugin_manager, resolve_family
    from qkcore.sources.documents import iter_documents, open_dataset
    from qkcore.sources.model import load_architecture, load_model, resolve_device
    from qkcore.sources.tokenizer import load_tokenizer

    start = time.perf_counter()
    device = resolve_device(cfg.model.device_map)
    data = open_dataset(cfg.dataset)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    config = load_architecture(cfg.model)
    family = resolve_family(make_plugin_manager(), config.model_type)
    model = load_model(cfg.model, config, family.hooks.qkcore_model_class(config=config), resolve_dtype(cfg.model.dtype), device)
    backbone = family.hooks.qkcore_backbone(model=model)
    loaded = time.perf_counter()
    tokens = 0
    batches = tokenize_batches(iter_documents(data, cfg.dataset), tokenizer,
                               max_length=cfg.tokenizer.max_length, batch_size=cfg.inference.batch_size)
    with torch.inference_mode():
        for batch in batches:
            backbone(input_ids=batch.input_ids.to(device), use_cache=False)
            tokens += batch.tokens
    end = time.perf_counter()
    return {"load_s": loaded - start, "run_s": end - loaded, "total_s": end - start, "tokens": tokens}


def sniff(cfg: Any) -> dict[str, float]:
    """``qkcore sniff`` as the command runs it; ``load`` ends when its model is loaded and planned."""
    from qkcore.sniff import run_sniff

    start = time.perf_counter()
    result = run_sniff(cfg, restart=True)
    end = time.perf_counter()
    loaded = start + result.seconds["loaded"]
    return {"load_s": loaded - start, "run_s": end - loaded, "total_s": end - start, "tokens": result.tokens,
            "rows": sum(result.rows.values()), "configs": len(result.rows)}


def main() -> None:
    from qkcore import __version__
    from qkcore.config import load_config
    from qkcore.logs import configure_logging

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo" / "smollm2-135m.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    configure_logging()
    import structlog
    import logging

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, overrides=[*args.overrides, f"output.data_root={Path(tmp) / 'out'}"])
        phases = [("bare", bare(cfg)), ("sniff", sniff(cfg)), ("bare", bare(cfg))]
    import transformers

    bare_runs = [m for name, m in phases if name == "bare"]
    sniffed = phases[1][1]
    ratio = {k: sniffed[k] / (sum(m[k] for m in bare_runs) / 2) for k in ("load_s", "run_s", "total_s")}
    print(f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print(f"# python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"qkcore {__version__}; config {args.config} {' '.join(args.overrides)}")
    print(f"{'phase':<6} {'load s':>8} {'run s':>8} {'total s':>8} {'tokens':>8} {'tok/s (run)':>12}")
    for name, m in phases:
        print(f"{name:<6} {m['load_s']:>8.1f} {m['run_s']:>8.1f} {m['total_s']:>8.1f} {m['tokens']:>8,} "
              f"{m['tokens'] / m['run_s']:>12,.0f}")
    print(f"sniff / bare: load {ratio['load_s']:.3f}, run {ratio['run_s']:.3f}, whole run {ratio['total_s']:.3f} "
          f"({sniffed['configs']} configs, {sniffed['rows']:,} rows written); the two bare runs differ by "
          f"{abs(bare_runs[0]['total_s'] - bare_runs[1]['total_s']) / min(m['total_s'] for m in bare_runs):.1%}")
    if args.json:
        args.json.write_text(json.dumps({"phases": phases, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
