"""Measure one capture forward's peak host memory on the CPU (tests only; Linux /proc).

``python tests/memory_probe.py CONFIG``: loads the run's model, runs one warm-up forward,
resets the peak (``/proc/self/clear_refs``), runs one batch of ``inference.batch_size``
documents at ``tokenizer.max_length`` through the capture, and prints JSON: the resident
memory the weights added, the peak above it during the forward, and qkcore plan's estimate.
"""

from __future__ import annotations

import json
import sys

import torch


def _status(key: str) -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(path: str) -> None:
    from qkcore.batching import Batch
    from qkcore.config import load_config
    from qkcore.plan_memory import device_memory
    from qkcore.plugins import make_plugin_manager
    from qkcore.stages.capture import Sniffer
    from qkcore.stages.load import load_inputs, load_weights

    torch.set_num_threads(1)
    cfg = load_config(path)
    inputs = load_inputs(cfg, make_plugin_manager())
    model_class = inputs.family.hooks.qkcore_model_class(config=inputs.architecture)
    with torch.device("meta"):  # imports the modeling code now: its pages are not the weights
        model_class.from_config(inputs.architecture)
    torch.nn.Linear(64, 64)  # and the CPU initialisation code
    before = _status("VmRSS")
    sniffer = Sniffer(inputs, load_weights(inputs))
    loaded = _status("VmRSS")
    b, t = cfg.inference.batch_size, cfg.tokenizer.max_length
    generator = torch.Generator().manual_seed(0)
    with sniffer.instrumented():
        for length in (16, t):  # a short warm-up forward first: one-time allocations are not the run's peak
            ids = torch.randint(0, 250, (b, length), generator=generator)
            batch = Batch(example_ids=list(range(b)), lengths=[length] * b, input_ids=ids)
            if length == t:
                open("/proc/self/clear_refs", "w", encoding="ascii").write("5")  # the peak restarts from here
                start = _status("VmRSS")
            sniffer.capture_batch(batch)
        peak = _status("VmHWM")
    estimate = device_memory(sniffer.model, cfg, sniffer.plan.heads, sniffer.sampler, 1)
    print(json.dumps({
        "weights": loaded - before, "forward": peak - start,
        "estimate_weights": estimate.weights, "estimate_forward": estimate.activations + estimate.buffers,
    }))


if __name__ == "__main__":
    main(sys.argv[1])
