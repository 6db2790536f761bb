#!/usr/bin/env python
"""Overhead of ``qkcore sniff`` over the bare backbone forward, on the same token ids.

In one process, per shape (one :class:`qkcore.stages.capture.Sniffer`, model loaded once)
and per sequence length, this runs interleaved (A B A B ...):

A  bare:  ``with torch.inference_mode(): sniffer.backbone(input_ids=ids, use_cache=False)``
          (sdpa, capture not attached).
B  sniff: what ``qkcore sniff`` does for one document: tokenise the next document,
          ``with sniffer.instrumented(): chunks = sniffer.capture_batch(batch)``
          (sampler masks, forward with the capture, gather of the kept rows, one
          device->host copy), ``DatasetWriter.add`` for every chunk, then
          ``writer.close()`` and the dataset card into a fresh temporary data_root.

Both run on the same random token ids (fixed seed); the tokenised text is only
timed, its ids are not used. Each of A and B is warmed up once per length; the
median over ``--reps`` repetitions is reported.

Reported per (shape, length):
  * tokens/s of A and of B's per-document path (``capture_batch`` + ``writer.add``;
    tokenisation is not in it, A starts from ids too), their ratio (PASS/FAIL on a
    GPU against the targets below) and the forward-only ratio;
  * the one-document-run ratio (B including attach/detach, ``close()`` and the
    card), and how many documents a run needs to amortise those fixed costs;
  * "overlap": the share of B's wall time spent on the host between forwards,
    ``(B - forward) / B`` with tokenising the next document included, for the
    per-document path and the one-document run;
  * peak GPU memory (``max_memory_allocated``, reset per phase) and peak host RSS
    (VmHWM, reset per phase through /proc/self/clear_refs; ``ru_maxrss`` fallback).

Targets (GPU): per-document sniff/bare wall time <= 1.01 at >= 32k tokens and
<= 1.03 below; peak GPU memory of B <= 1.01 x that of A. See docs/benchmarks.md.

    python benchmarks/overhead.py --quick                      # CPU, < 2 min
    python benchmarks/overhead.py --shapes llama-3.2-1b,qwen3-8b \
        --lengths 4096,32768,131072 --reps 3 --json overhead.json   # GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

# Never download anything: random weights, built-in byte tokenizer, local jsonl.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_TMP_ROOT = Path(tempfile.gettempdir())  # replaced by a fresh directory in main()

import torch  # noqa: E402
import yaml  # noqa: E402

# ---------------------------------------------------------------------------- shapes
#: Real architecture shapes (random weights). Values from the models' config.json.
SHAPES: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # Qwen/Qwen3-8B (max_position_embeddings is 40960 there; raised below to the longest length)
    "qwen3-8b": {
        "model_type": "qwen3",
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "use_sliding_window": False,
        "rope_theta": 1000000.0,
    },
    # HuggingFaceTB/SmolLM3-3B (every 4th layer is NoPE)
    "smollm3-3b": {
        "model_type": "smollm3",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 65536,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "no_rope_layer_interval": 4,
        "rope_theta": 5000000.0,
    },
    # Small shapes for CPU runs: same families, shrunk so that a 4k-token forward takes about a second on 2 cores.
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
    },
    "tiny-qwen3": {
        "model_type": "qwen3",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "rope_theta": 1000000.0,
    },
}

QUICK = {"shapes": "tiny-llama,tiny-qwen3", "lengths": "2048,4096", "reps": 3}
GPU_DEFAULT = {"shapes": "llama-3.2-1b,qwen3-8b", "lengths": "4096,32768,131072", "reps": 3}

#: (minimum tokens, max per-document sniff/bare wall-time ratio); first match wins.
TIME_TARGETS = [(32768, 1.01), (0, 1.03)]
MEMORY_TARGET = 1.01  # peak GPU memory of B <= 1.01 x peak of A


def time_target(tokens: int) -> float:
    return next(limit for minimum, limit in TIME_TARGETS if tokens >= minimum)


# ---------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str | None:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    import qkcore

    info: dict[str, Any] = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": _loadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "qkcore": qkcore.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


# ---------------------------------------------------------------------------- memory
class HostPeak:
    """Peak resident set size of this process over a phase.

    Linux: VmHWM from /proc/self/status, reset to the current RSS by writing "5"
    to /proc/self/clear_refs. Elsewhere (or if that is refused) ``ru_maxrss``,
    which only grows: a phase that stays below an earlier peak reads as +0.
    """

    def __init__(self) -> None:
        self.resettable = self._try_reset()
        self.method = "VmHWM (reset per phase)" if self.resettable else "ru_maxrss (monotonic)"
        self.start = 0

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return HostPeak._status("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
        except OSError:
            return None
        return int(match.group(1)) * 1024 if match else None

    def current(self) -> int:
        rss = self._status("VmRSS")
        return rss if rss is not None else self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return value if sys.platform == "darwin" else value * 1024  # bytes on macOS, KiB on Linux

    def reset(self) -> None:
        if self.resettable:
            self._try_reset()
            self.start = self.current()
        else:
            self.start = self._maxrss()

    def peak(self) -> tuple[int, int]:
        """(peak bytes during the phase, peak minus the RSS at its start)."""
        peak = (self._status("VmHWM") or self._maxrss()) if self.resettable else self._maxrss()
        return peak, max(0, peak - self.start)


class GpuPeak:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)

    def peak(self) -> tuple[int, int]:
        if self.device.type != "cuda":
            return 0, 0
        peak = torch.cuda.max_memory_allocated(self.device)
        return peak, peak - self.start


# ---------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timers:
    """Wall-time accumulators for the pieces of one B repetition."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.values[name] = self.values.get(name, 0.0) + seconds

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def wrap(self, name: str, fn: Callable[..., Any], device: torch.device | None = None) -> Callable[..., Any]:
        """``fn`` timed under ``name``; with ``device``, synchronised before and after."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            if device is not None:
                sync(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if device is not None:
                    sync(device)
                self.add(name, time.perf_counter() - start)

        return timed


@contextmanager
def timed_internals(sniffer: Any, timers: Timers) -> Iterator[None]:
    """Time the sampler step, the forward and the host copy inside ``capture_batch``.

    Instance attributes shadow the methods for one B repetition, so ``capture_batch``
    itself runs unchanged. The forward is synchronised on both sides (the GPU is
    idle there anyway: ``end_batch`` synchronises and the host has not issued work).
    """
    session, backbone = sniffer.session, sniffer.backbone
    session.begin_batch = timers.wrap("sampler", session.begin_batch)
    session.end_batch = timers.wrap("to_host", session.end_batch)
    sniffer.backbone = timers.wrap("forward", sniffer.backbone, sniffer.device)
    try:
        yield
    finally:
        del session.begin_batch, session.end_batch
        sniffer.backbone = backbone


def write_config(
    workdir: Path, shape: str, architecture: dict[str, Any], device: torch.device, args: argparse.Namespace
) -> Path:
    """A run config like a user's: random weights from ``architecture``, byte tokenizer, tiny jsonl."""
    corpus = workdir / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "bench-doc", "text": "A document the benchmark never reads."}) + "\n")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    config = {
        "dataset": {"path": str(corpus), "text_column": "text", "id_column": "id"},
        "model": {
            "name": f"bench/{shape}",
            "config": architecture,
            "dtype": dtype,
            "device_map": str(device),
            "attn_implementation": "sdpa",
            "init_seed": 0,
        },
        "tokenizer": {"name": "qkcore:bytes", "max_length": max(args.lengths)},
        # autocast in the model dtype: capture_batch autocasts on CUDA; another dtype
        # would cast (and cache) every weight and make A and B compute differently.
        "inference": {"batch_size": 1, "autocast_dtype": dtype},
        "capture": {
            "sampler": {"type": "uniform", "base_rate": 1.0},
            "min_bucket_size": args.min_bucket_size,
            "head_sampling": {"count": args.head_count, "seed": 0},
            "full_attention_only": True,
            "capture_pre_rope": False,
        },
        "output": {"data_root": str(workdir / "unused-data-root")},
    }
    path = workdir / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def random_text(tokens: int, seed: int) -> str:
    """ASCII text of ``tokens`` bytes: exactly ``tokens`` ids with the byte tokenizer."""
    rng = random.Random(seed)
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz      ", k=tokens))


def human_bytes(value: float) -> str:
    return f"{value / 2**30:.2f}G" if value >= 2**30 else f"{value / 2**20:.0f}M"


# ---------------------------------------------------------------------------- A and B
def run_bare(sniffer: Any, bare: torch.nn.Module, batch: Any, gpu: GpuPeak, host: HostPeak) -> dict[str, float]:
    device = sniffer.device
    gc.collect()
    sync(device)
    gpu.reset()
    host.reset()
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        input_ids = batch.input_ids.to(device, non_blocking=True)
        out = bare(input_ids=input_ids, use_cache=False)
    sync(device)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    gpu_peak, gpu_delta = gpu.peak()
    host_peak, host_delta = host.peak()
    del out, input_ids
    return {"total": seconds, "cpu": cpu_seconds, "gpu_peak": gpu_peak, "gpu_delta": gpu_delta,
            "host_peak": host_peak, "host_delta": host_delta}


def run_sniff(
    sniffer: Any, batch: Any, text: str, data_root: Path, gpu: GpuPeak, host: HostPeak
) -> dict[str, float]:
    """One document through the whole sniff path into a fresh ``data_root``."""
    from qkcore.batching import tokenize_batches
    from qkcore.card import render_card
    from qkcore.run_state import RunState
    from qkcore.stages.finish import model_entry
    from qkcore.sources.documents import Document
    from qkcore.writer import DatasetWriter

    cfg, device = sniffer.cfg, sniffer.device
    timers = Timers()
    tokens = batch.tokens
    gc.collect()
    sync(device)
    gpu.reset()
    host.reset()
    start = time.perf_counter()
    with timers.time("attach"):
        writer = DatasetWriter(
            data_root / ".staging", flush_threshold_mb=cfg.output.flush_threshold_mb,
            row_group_size=cfg.output.write_batch_size,
        )
        instrumented = sniffer.instrumented()
        instrumented.__enter__()
    try:
        # Per document: tokenise (the next document), capture, hand rows to the writer.
        with timers.time("tokenise"):
            next(tokenize_batches([Document(batch.example_ids[0], text)], sniffer.tokenizer,
                                  max_length=tokens, batch_size=1))
        cpu_start = time.process_time()
        with timers.time("capture"), timed_internals(sniffer, timers):
            chunks = sniffer.capture_batch(batch)
        with timers.time("add"):
            for chunk in chunks:
                writer.add(chunk)
        timers.add("doc_cpu", time.process_time() - cpu_start)
    except BaseException:
        instrumented.__exit__(*sys.exc_info())
        writer.abort()
        raise
    with timers.time("detach"):
        instrumented.__exit__(None, None, None)
    with timers.time("close"):
        stats = writer.write_final_files(data_root)
        writer.discard()
        rows = {name: s.rows for name, s in stats.items()}
    with timers.time("card"):
        state = RunState(sniffer.inputs.identity, documents=len(batch.lengths), tokens=tokens,
                         example_ids=tuple(batch.example_ids))
        (data_root / "README.md").write_text(render_card(model_entry(sniffer, state, stats), stats), encoding="utf-8")
    sync(device)
    total = time.perf_counter() - start
    gpu_peak, gpu_delta = gpu.peak()
    host_peak, host_delta = host.peak()
    t = timers.values
    return {
        # What the ratios compare with A (tokenisation is not part of them, see the module doc).
        "doc": t["capture"] + t["add"],
        "run": t["attach"] + t["capture"] + t["add"] + t["detach"] + t["close"] + t["card"],
        "wall": total,  # the whole phase, tokenisation included
        "doc_cpu": t["doc_cpu"],  # process CPU time of capture + add (all threads)
        "forward": t["forward"],
        "tokenise": t["tokenise"],
        "sampler": t["sampler"],
        "to_host": t["to_host"],
        "capture_other": t["capture"] - t["sampler"] - t["forward"] - t["to_host"],
        "add": t["add"],
        "attach": t["attach"],
        "detach": t["detach"],
        "close": t["close"],
        "card": t["card"],
        "rows": float(sum(rows.values())),
        "configs": float(len(rows)),
        "gpu_peak": gpu_peak,
        "gpu_delta": gpu_delta,
        "host_peak": host_peak,
        "host_delta": host_delta,
    }


def bench_shape(
    shape: str, args: argparse.Namespace, device: torch.device, host: HostPeak, on_row: Callable[[dict], None]
) -> None:
    from qkcore.batching import Batch
    from qkcore.config import load_config
    from qkcore.stages.capture import Sniffer

    architecture = dict(SHAPES[shape])
    architecture["max_position_embeddings"] = max(architecture["max_position_embeddings"], max(args.lengths))
    workdir = Path(tempfile.mkdtemp(prefix=f"{shape}-", dir=_TMP_ROOT))
    cfg = load_config(write_config(workdir, shape, architecture, device, args))
    gpu = GpuPeak(device)

    print(f"\n== {shape}: building (random weights, {cfg.model.dtype}, sdpa) ...", flush=True)
    started = time.perf_counter()
    sniffer = Sniffer.from_config(cfg)  # random weights are initialised directly on the device
    sync(device)
    build_s = time.perf_counter() - started
    bare = sniffer.backbone
    plan = sniffer.plan
    q_heads = sum(len(h) for (_, kind), h in plan.heads.items() if kind == "q")
    k_heads = sum(len(h) for (_, kind), h in plan.heads.items() if kind == "k")
    params = sum(p.numel() for p in sniffer.model.parameters())
    print(
        f"   built in {build_s:.1f}s: {params / 1e9:.2f}B params, capture {len(plan.layers)} layers, "
        f"{q_heads} query + {k_heads} key heads, uniform p_keep=1/{args.min_bucket_size}",
        flush=True,
    )

    for tokens in sorted(args.lengths):
        generator = torch.Generator().manual_seed(args.seed + tokens)
        input_ids = torch.randint(0, architecture["vocab_size"], (1, tokens), generator=generator, dtype=torch.long)
        batch = Batch(example_ids=[args.seed * 1_000_003 + tokens], lengths=[tokens], input_ids=input_ids)
        text = random_text(tokens, args.seed + tokens)
        a_runs: list[dict[str, float]] = []
        b_runs: list[dict[str, float]] = []
        for rep in range(args.reps + 1):  # rep 0 is the warm-up of each
            a = run_bare(sniffer, bare, batch, gpu, host)
            root = workdir / f"data-{tokens}-{rep}"
            try:
                b = run_sniff(sniffer, batch, text, root, gpu, host)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            label = "warm-up" if rep == 0 else f"rep {rep}/{args.reps}"
            print(
                f"   {tokens:>7} tok {label:>8}: bare {a['total']:.4f}s  sniff doc {b['doc']:.4f}s "
                f"(forward {b['forward']:.4f}s)  1-doc run {b['run']:.4f}s  tokenise {b['tokenise']:.4f}s",
                flush=True,
            )
            if rep:
                a_runs.append(a)
                b_runs.append(b)
        row = summarise(shape, tokens, device, a_runs, b_runs, build_s)
        print(
            f"   => {tokens} tok: ratio {row['ratio']:.3f} (target {row['target']}) {row['time_result']}, "
            f"memory ratio {row['memory_ratio']:.4f} {row['memory_result']}, host between forwards "
            f"{row['host_share_doc']:.1%} per doc",
            flush=True,
        )
        on_row(row)

    del sniffer, bare, plan
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(workdir, ignore_errors=True)


def summarise(
    shape: str, tokens: int, device: torch.device, a_runs: list[dict], b_runs: list[dict], build_s: float
) -> dict[str, Any]:
    def med(runs: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    def peak(runs: list[dict], key: str) -> float:
        return max(run[key] for run in runs)

    bare = med(a_runs, "total")
    doc = med(b_runs, "doc")
    run1 = med(b_runs, "run")
    forward = med(b_runs, "forward")
    tokenise = med(b_runs, "tokenise")
    fixed = sum(med(b_runs, key) for key in ("attach", "detach", "close", "card"))
    ratio = doc / bare
    bare_times = [run["total"] for run in a_runs]
    target = time_target(tokens)
    slack = (target - ratio) * bare
    amortise = fixed / slack if slack > 0 else None  # None: never meets the target
    on_gpu = device.type == "cuda"
    row: dict[str, Any] = {
        "shape": shape,
        "tokens": tokens,
        "reps": len(a_runs),
        "build_s": build_s,
        "bare_s": bare,
        "bare_tok_s": tokens / bare,
        "sniff_doc_s": doc,
        "sniff_doc_tok_s": tokens / doc,
        "ratio": ratio,
        "ratio_of_minima": min(run["doc"] for run in b_runs) / min(bare_times),
        # Process CPU time (all threads): steadier than wall time on a shared CPU; meaningless on a GPU.
        "cpu_time_ratio": med(b_runs, "doc_cpu") / med(a_runs, "cpu"),
        "bare_spread": (max(bare_times) - min(bare_times)) / bare,
        "forward_s": forward,
        "forward_ratio": forward / bare,
        "sniff_run_s": run1,
        "run_ratio": run1 / bare,
        "fixed_s": fixed,
        "docs_to_amortise": amortise,
        # Overlap: host time between forwards, tokenising the next document included.
        "host_share_doc": (tokenise + doc - forward) / (tokenise + doc),
        "host_share_run": (tokenise + run1 - forward) / (tokenise + run1),
        "target": target,
        "time_result": ("PASS" if ratio <= target else "FAIL") if on_gpu else "cpu-info",
        "parts_s": {key: med(b_runs, key) for key in
                    ("tokenise", "sampler", "forward", "to_host", "capture_other", "add",
                     "attach", "detach", "close", "card")},
        "rows": med(b_runs, "rows"),
        "configs": med(b_runs, "configs"),
        "gpu_peak_bare": peak(a_runs, "gpu_peak"),
        "gpu_peak_sniff": peak(b_runs, "gpu_peak"),
        "gpu_act_bare": peak(a_runs, "gpu_delta"),
        "gpu_act_sniff": peak(b_runs, "gpu_delta"),
        "host_peak_bare": peak(a_runs, "host_peak"),
        "host_peak_sniff": peak(b_runs, "host_peak"),
        "host_delta_bare": peak(a_runs, "host_delta"),
        "host_delta_sniff": peak(b_runs, "host_delta"),
        "raw": {"bare": a_runs, "sniff": b_runs},
    }
    if on_gpu:
        row["memory_ratio"] = row["gpu_peak_sniff"] / row["gpu_peak_bare"]
        row["memory_result"] = "PASS" if row["memory_ratio"] <= MEMORY_TARGET else "FAIL"
    else:
        row["memory_ratio"] = row["host_peak_sniff"] / row["host_peak_bare"]
        row["memory_result"] = "cpu-info"
    return row


# ---------------------------------------------------------------------------- report
def print_tables(rows: list[dict[str, Any]], device: torch.device, host: HostPeak) -> None:
    on_gpu = device.type == "cuda"
    print("\n## Throughput (median over reps; sniff per document = capture_batch + writer.add)")
    cpu_col = "" if on_gpu else f"{'cpu-time':>9}"
    print(f"{'shape':<14}{'tokens':>8}{'bare tok/s':>12}{'sniff tok/s':>13}{'ratio':>8}{'target':>8}  {'result':<9}"
          f"{'min/min':>8}{cpu_col}{'noise':>7}{'fwd ratio':>10}{'1-doc run':>10}{'fixed s':>9}{'amortise':>11}")
    for r in rows:
        amortise = "never" if r["docs_to_amortise"] is None else f"{r['docs_to_amortise']:.0f} docs"
        cpu_val = "" if on_gpu else f"{r['cpu_time_ratio']:>9.3f}"
        print(f"{r['shape']:<14}{r['tokens']:>8}{r['bare_tok_s']:>12,.0f}{r['sniff_doc_tok_s']:>13,.0f}"
              f"{r['ratio']:>8.3f}{r['target']:>8.2f}  {r['time_result']:<9}{r['ratio_of_minima']:>8.3f}{cpu_val}"
              f"{r['bare_spread']:>7.1%}{r['forward_ratio']:>10.3f}{r['run_ratio']:>10.3f}{r['fixed_s']:>9.3f}"
              f"{amortise:>11}")
    print("   ratio = median sniff per-document time / median bare time (PASS/FAIL on a GPU); min/min = fastest / "
          "fastest; cpu-time (CPU runs) = the same ratio in process CPU time; noise = (max - min) / median of the "
          "bare reps; fwd ratio = instrumented forward alone / bare; "
          "1-doc run = attach + capture + add + detach + close() + card, over bare; fixed s = attach + detach + "
          "close + card; amortise = documents a run needs before its whole-run ratio meets the target")

    print("\n## Overlap: host time between forwards (median seconds per B repetition)")
    print(f"{'shape':<14}{'tokens':>8}{'forward':>9}{'tokenise':>9}{'sampler':>9}{'to_host':>9}{'other':>8}"
          f"{'add':>8}{'host/doc':>9}{'close':>8}{'card':>8}{'host/run':>9}{'rows':>7}{'configs':>8}")
    for r in rows:
        p = r["parts_s"]
        print(f"{r['shape']:<14}{r['tokens']:>8}{p['forward']:>9.3f}{p['tokenise']:>9.4f}{p['sampler']:>9.4f}"
              f"{p['to_host']:>9.4f}{p['capture_other']:>8.4f}{p['add']:>8.4f}{r['host_share_doc']:>9.1%}"
              f"{p['close']:>8.3f}{p['card']:>8.3f}{r['host_share_run']:>9.1%}{r['rows']:>7.0f}{r['configs']:>8.0f}")
    print("   host/doc = (tokenise + capture + add - forward) / (tokenise + capture + add); "
          "host/run = the same with attach, detach, close and card added")

    print(f"\n## Peak memory (max over reps; host: {host.method})")
    if on_gpu:
        print(f"{'shape':<14}{'tokens':>8}{'GPU bare':>10}{'GPU sniff':>11}{'ratio':>8}  {'result':<7}"
              f"{'act bare':>10}{'act sniff':>11}{'RSS bare':>10}{'RSS sniff':>11}{'+RSS bare':>11}{'+RSS sniff':>12}")
    else:
        print(f"{'shape':<14}{'tokens':>8}{'RSS bare':>10}{'RSS sniff':>11}{'ratio':>8}  {'result':<9}"
              f"{'+RSS bare':>11}{'+RSS sniff':>12}")
    for r in rows:
        if on_gpu:
            print(f"{r['shape']:<14}{r['tokens']:>8}{human_bytes(r['gpu_peak_bare']):>10}"
                  f"{human_bytes(r['gpu_peak_sniff']):>11}{r['memory_ratio']:>8.4f}  {r['memory_result']:<7}"
                  f"{human_bytes(r['gpu_act_bare']):>10}{human_bytes(r['gpu_act_sniff']):>11}"
                  f"{human_bytes(r['host_peak_bare']):>10}{human_bytes(r['host_peak_sniff']):>11}"
                  f"{human_bytes(r['host_delta_bare']):>11}{human_bytes(r['host_delta_sniff']):>12}")
        else:
            print(f"{r['shape']:<14}{r['tokens']:>8}{human_bytes(r['host_peak_bare']):>10}"
                  f"{human_bytes(r['host_peak_sniff']):>11}{r['memory_ratio']:>8.4f}  {r['memory_result']:<9}"
                  f"{human_bytes(r['host_delta_bare']):>11}{human_bytes(r['host_delta_sniff']):>12}")
    if on_gpu:
        print(f"   GPU = torch.cuda.max_memory_allocated (weights included); act = peak - allocated at phase start; "
              f"target sniff <= {MEMORY_TARGET} x bare")
    print("   RSS = peak resident set during the phase; +RSS = peak - RSS at phase start")


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"CPU run: shapes {QUICK['shapes']}, lengths {QUICK['lengths']}, "
                             f"{QUICK['reps']} reps, 1 thread")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available; cpu with --quick)")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, from: {', '.join(SHAPES)}")
    parser.add_argument("--lengths", default=None, help="comma-separated token counts per document")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (after one warm-up)")
    parser.add_argument("--min-bucket-size", type=int, default=None,
                        help="uniform sampler min_bucket_size (p_keep = 1/size); default 8192 on GPU, 256 on CPU")
    parser.add_argument("--head-count", type=int, default=300, help="capture.head_sampling.count")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own; 1 steadies CPU timings on a shared machine)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    defaults = QUICK if args.quick or args.device == "cpu" else GPU_DEFAULT
    args.shapes = [s.strip() for s in (args.shapes or defaults["shapes"]).split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    args.lengths = [int(n) for n in (args.lengths or defaults["lengths"]).split(",") if n.strip()]
    args.reps = args.reps if args.reps is not None else defaults["reps"]
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.min_bucket_size is None:
        args.min_bucket_size = 8192 if args.device.startswith("cuda") else 256
    return args


def main(argv: list[str] | None = None) -> int:
    global _TMP_ROOT
    args = parse_args(argv)
    _TMP_ROOT = Path(tempfile.mkdtemp(prefix="qkcore-bench-"))
    # The one-line jsonl dataset is cached by `datasets`; keep that cache with the run's files.
    os.environ.setdefault("HF_DATASETS_CACHE", str(_TMP_ROOT / "hf-datasets"))
    if args.threads is None and args.quick:
        args.threads = 1  # steadier and faster on a small or shared CPU; --threads overrides
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
        args.device = str(device)

    from qkcore.logs import configure_logging

    configure_logging()  # structlog lines on stderr, tables on stdout
    host = HostPeak()
    info = machine_info(device)
    print("# qkcore sniff overhead benchmark")
    for key, value in info.items():
        print(f"  {key}: {value}")
    command = " ".join(["python", "benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"  command: {command}")
    print(f"  shapes={','.join(args.shapes)} lengths={','.join(map(str, args.lengths))} reps={args.reps} "
          f"sampler=uniform min_bucket_size={args.min_bucket_size} base_rate=1.0 "
          f"head_sampling.count={args.head_count} full_attention_only post-RoPE attn=sdpa", flush=True)

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def on_row(row: dict[str, Any]) -> None:
        # Written after every (shape, length), so a run cut short keeps what it measured.
        rows.append(row)
        if args.json is not None:
            payload = {"machine": info, "command": command,
                       "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                       "targets": {"time": TIME_TARGETS, "memory": MEMORY_TARGET},
                       "host_memory_method": host.method, "results": rows}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")

    try:
        for shape in args.shapes:
            bench_shape(shape, args, device, host, on_row)
    finally:
        shutil.rmtree(_TMP_ROOT, ignore_errors=True)
        if rows:
            print_tables(rows, device, host)
        if args.json is not None and rows:
            print(f"\nwrote {args.json}")
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
