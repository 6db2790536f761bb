"""``qkcore plan``: memory per device, the smallest tensor-parallel size that fits, and the estimate against a measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qkcore.cli import main
from qkcore.config import load_config
from qkcore.plan_memory import command, memory_plan, parse_size
from qkcore.testing import tiny_architecture

REPO = Path(__file__).resolve().parents[2]
#: Large enough that weights and activations dwarf the allocator's noise (tens of MB).
MEASURED = tiny_architecture("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=4, head_dim=64)


def test_sizes_parse_in_binary_and_decimal_units() -> None:
    assert parse_size("80GiB") == 80 * 2**30 and parse_size("141 GB") == 141 * 10**9 and parse_size("1024") == 1024
    with pytest.raises(Exception, match="--gpu-memory: '80 gigs' is not a size"):
        parse_size("80 gigs")


def test_memory_shrinks_with_k_and_the_smallest_fitting_k_is_chosen(tiny_config) -> None:
    cfg = load_config(tiny_config(tokenizer={"max_length": 4096}, model={"attn_implementation": "eager"}))
    plan = memory_plan(cfg)
    assert [e.tensor_parallel_size for e in plan.estimates] == [1, 2]  # divisors of the 2 key/value heads
    one, two = plan.estimates
    assert two.weights < one.weights and two.activations < one.activations
    between = memory_plan(cfg, device_bytes=int((one.total + two.total) / 2))
    assert between.fitting() == two
    assert memory_plan(cfg, device_bytes=int(one.total) + 1).fitting() == one
    assert memory_plan(cfg, device_bytes=int(two.total) - 1).fitting() is None


def test_plan_prints_memory_and_the_command_for_the_smallest_k(tiny_config, capsys) -> None:
    config = tiny_config(tokenizer={"max_length": 4096}, model={"attn_implementation": "eager"})
    one, two = memory_plan(load_config(config)).estimates
    size = str(int((one.total + two.total) / 2))
    assert main(["plan", "--config", str(config), "--documents", "3", "--gpu-memory", size]) == 0
    out = capsys.readouterr().out
    assert "memory per device at tokenizer.max_length 4,096 (batch 2, attention eager)" in out
    assert "smallest K that fits" in out and f"torchrun --nproc-per-node 2 -m qkcore sniff --config {config}" in out
    assert "--set inference.tensor_parallel_size=2" in out
    assert command("run.yaml", 1) == "qkcore sniff --config run.yaml"


def test_a_bad_gpu_memory_is_one_error(tiny_config, capsys) -> None:
    assert main(["plan", "--config", str(tiny_config()), "--gpu-memory", "lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--gpu-memory: 'lots' is not a size" in err[0]


def test_a_family_without_a_tp_plan_plans_one_process(tiny_config) -> None:
    mllama = {"model_type": "mllama", "text_config": {**tiny_architecture("llama"), "cross_attention_layers": [1],
                                                       "model_type": "mllama_text_model"},
              "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                "num_global_layers": 1, "attention_heads": 2, "image_size": 28, "patch_size": 14,
                                "vision_output_dim": 64}}
    plan = memory_plan(load_config(tiny_config(mllama)))
    assert [e.tensor_parallel_size for e in plan.estimates] == [1] and "no tensor-parallel plan" in plan.note


@pytest.mark.slow  # a subprocess per attention implementation
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_the_estimate_is_within_20_percent_of_the_measured_peak_on_the_cpu(tmp_path, attn_implementation) -> None:
    """Weights, and the forward's peak above them, measured as resident memory of a run on the CPU.

    glibc's malloc raises its mmap threshold (up to 32 MiB) after freeing large blocks and
    then keeps freed activations in its heap: fixed at 128 KiB, every activation is its
    own mapping and resident memory follows the tensors.
    """
    from qkcore.testing import write_run_config

    config = write_run_config(tmp_path, MEASURED, model={"attn_implementation": attn_implementation},
                              tokenizer={"max_length": 2048}, inference={"batch_size": 1},
                              capture={"sampler": {"type": "all"}, "head_sampling": {"count": 4, "seed": 0}})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "memory_probe.py"), str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    for part in ("weights", "forward"):
        estimate, actual = measured[f"estimate_{part}"], measured[part]
        assert abs(estimate - actual) <= 0.2 * actual, f"{part}: estimate {estimate:,.0f} vs measured {actual:,.0f}"
