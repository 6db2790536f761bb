"""Tensor-parallel capture under torchrun (gloo, CPU): rows, oracle, errors, kill -9 and resume.

A torchrun launch costs more than a tiny run here, so each launch runs several configs
(``tests/torchrun_sniffs.py``) and the tests check what they wrote.

**Tolerance, measured and explained.** Query/key rows of layer 0 are bit-identical to a
one-process run: nothing is summed across ranks before them (each token's embedding row
lives on one rank; the others add zeros). From layer 1 on, the row-parallel ``o_proj`` and
``down_proj`` of the layers below sum their partial products rank by rank, in another order
than one device's matmul: measured on the tiny families (fp32) at most 7.5e-7 of the
config's largest |value|, and (bf16) at most 1.5e-2 of it, i.e. two bfloat16 steps at that
magnitude (bf16 keeps 8 significant bits: a step is 2^-7 of the value or less). Pinned at
``FP32_TOLERANCE`` = 1e-5 and ``BF16_TOLERANCE`` = 4 * 2^-7 of the config's largest |value|.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from qkcore.card import read_front_matter
from qkcore.config import load_config
from qkcore.output import LocalDataRoot
from qkcore.sniff import run_sniff
from qkcore.testing import TEXTS, EagerReference, capture_all, eager_reference, tiny_architecture, write_run_config
from qkcore.writer import JOURNAL_FILE

pytestmark = pytest.mark.slow  # torchrun launches

REPO = Path(__file__).resolve().parents[2]
FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 4 * 2.0**-7

YARN = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
#: family -> (architecture, model settings). Each has 8 query heads over 2 key/value heads.
FAMILIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "llama": (tiny_architecture("llama"), {}),
    "qwen3-yarn": (tiny_architecture("qwen3"), {"config_overrides": YARN}),  # q/k norms, the protocol's YaRN
    "smollm3": (tiny_architecture("smollm3", no_rope_layers=[1, 0]), {}),  # layer 1 is NoPE
    # sliding then full: the mask interface must give the sliding layer its window under TP too
    "gemma3": (tiny_architecture("gemma3_text", sliding_window=8, query_pre_attn_scalar=24,
                                 layer_types=["sliding_attention", "full_attention"]), {}),
    "ministral3": (tiny_architecture("ministral3"), {}),
}
WORDS = "tide gauge sluice harbour lantern glacier stake orchard graft relay hop loom warp heddle reed".split()
LONG_TEXTS = [(f"doc-{d:03d}", " ".join(WORDS[(d * 7 + i * 3) % len(WORDS)] for i in range(12 + d % 5)))
              for d in range(48)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _torchrun(nproc: int, results: Path, configs: list[Path]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(REPO / "tests" / "torchrun_sniffs.py"), str(results), *map(str, configs)]


def _launch(nproc: int, folder: Path, configs: list[Path]) -> tuple[list[list[int]], str]:
    """Run ``configs`` in one torchrun launch; each rank's exit codes, and the launch's stderr."""
    results = folder / "results"
    done = subprocess.run(_torchrun(nproc, results, configs), cwd=folder, env=_env(), capture_output=True, text=True,
                          timeout=540)
    codes = [json.loads((results / f"rank{r}.json").read_text()) for r in range(nproc)
             if (results / f"rank{r}.json").exists()]
    assert len(codes) == nproc, done.stderr[-4000:]
    return codes, done.stderr


def _checkpoint(folder: Path, architecture: dict[str, Any], model: dict[str, Any]) -> tuple[Path, EagerReference]:
    """The tiny model a run builds, saved as a checkpoint (TP loads shards of one), and its eager reference."""
    folder.mkdir(parents=True, exist_ok=True)
    reference = eager_reference(folder, architecture, **model)
    reference.model.save_pretrained(folder / "checkpoint")
    return folder / "checkpoint", reference


def _config(folder: Path, checkpoint: Path, model: dict[str, Any], texts=TEXTS, **sections: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    inference = {"batch_size": 2, **sections.pop("inference", {})}
    return write_run_config(folder, {}, texts=texts, model={"name": str(checkpoint), "config": None, **model},
                            inference=inference, capture=sections.pop("capture", capture_all()), **sections)


def _config_only(folder: Path, architecture: dict[str, Any]) -> Path:
    """A model folder with a config.json and no weights: an error about it came before any weights load."""
    from transformers import AutoConfig

    settings = dict(architecture)
    AutoConfig.for_model(settings.pop("model_type"), **settings).save_pretrained(folder)
    return folder


def _table(root: Path, name: str) -> dict[str, list]:
    return pq.read_table(root / name / "data.parquet").to_pydict()


def _configs(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob("l*/data.parquet"))


def assert_rows_match_one_process(tp_root: Path, one_root: Path, tolerance: float) -> None:
    """Same configs and rows (ids, positions, buckets, windows) as one process; vectors within ``tolerance``."""
    assert _configs(tp_root) == _configs(one_root) != []
    for name in _configs(one_root):
        tp, one = _table(tp_root, name), _table(one_root, name)
        for column in one:
            if column != "vector":
                assert tp[column] == one[column], f"{name}: {column}"
        a, b = np.asarray(tp["vector"], dtype=np.float64), np.asarray(one["vector"], dtype=np.float64)
        if name.startswith("l00"):  # nothing is summed across ranks before layer 0
            assert np.array_equal(a, b), name
        scale = float(np.abs(b).max())
        assert float(np.abs(a - b).max()) <= tolerance * scale, f"{name}: {np.abs(a - b).max()} > {tolerance} x {scale}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, Any]:
    """One launch of 2 processes, K = 2: every family, bf16, a longer run (the kill test's reference), bad inputs."""
    base = tmp_path_factory.mktemp("tp2")
    runs: dict[str, Any] = {"base": base, "references": {}, "checkpoints": {}}
    bad = {
        "k3": _config(base / "bad-k3", base, {}, inference={"tensor_parallel_size": 3}),
        "mllama": _config(base / "bad-mllama", _config_only(base / "mllama-config", {"model_type": "mllama"}), {},
                          inference={"tensor_parallel_size": 2}),
        "kv1": _config(base / "bad-kv1", _config_only(base / "kv1-config", tiny_architecture("llama", num_key_value_heads=1)),
                       {}, inference={"tensor_parallel_size": 2}),
        "device": _config(base / "bad-device", base, {"device_map": "cuda:1"}, inference={"tensor_parallel_size": 2}),
    }
    good: dict[str, Path] = {}
    for family, (architecture, model) in FAMILIES.items():
        checkpoint, reference = _checkpoint(base / family, architecture, model)
        runs["references"][family], runs["checkpoints"][family] = reference, checkpoint
        good[family] = _config(base / family / "tp", checkpoint, model, inference={"tensor_parallel_size": 2})
    llama = runs["checkpoints"]["llama"]
    good["llama-bf16"] = _config(base / "bf16" / "tp", llama, {"dtype": "bfloat16"}, inference={"tensor_parallel_size": 2})
    long_sections = dict(inference={"tensor_parallel_size": 2, "batch_size": 1},
                         capture={"sampler": {"type": "all"}, "head_sampling": {"count": 4, "seed": 1}})
    good["long"] = _config(base / "long" / "tp", llama, {}, texts=LONG_TEXTS, **long_sections)
    runs["long_sections"] = long_sections
    codes, stderr = _launch(2, base, [*bad.values(), *good.values()])
    runs.update(codes=codes, stderr=stderr, bad=list(bad), good={k: Path(load_config(p).output.data_root) for k, p in good.items()})
    runs["one"] = {}
    for name in [*FAMILIES, "llama-bf16"]:  # the same runs in one process
        family = "llama" if name == "llama-bf16" else name
        model = {"dtype": "bfloat16"} if name == "llama-bf16" else FAMILIES[family][1]
        one = _config(base / name / "one", runs["checkpoints"][family], model)
        runs["one"][name] = run_sniff(load_config(one)).data_root
    return runs


def test_bad_inputs_are_one_error_on_every_rank_before_weights_load(two_ranks) -> None:
    bad = len(two_ranks["bad"])
    assert [codes[:bad] for codes in two_ranks["codes"]] == [[2] * bad] * 2
    # Two ranks write to one stderr, between progress bars that end without a newline: count, not lines.
    stderr = two_ranks["stderr"]
    for words in (
        "inference.tensor_parallel_size: 3 does not divide the 2 torchrun processes",
        "model_type 'mllama' has no tensor-parallel plan",  # a folder without weights: nothing was loaded
        "does not divide the model's num_key_value_heads (1)",
        "model.device_map: 'cuda:1' with inference.tensor_parallel_size: 2",
    ):
        assert stderr.count(words) == 2, words  # once per rank
    assert stderr.count("qkcore: error:") == 2 * bad  # and nothing else failed


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_equal_a_one_process_run_within_the_reduction_tolerance(two_ranks, family) -> None:
    assert two_ranks["codes"][0][len(two_ranks["bad"]):] == [0] * len(two_ranks["good"])
    assert_rows_match_one_process(two_ranks["good"][family], two_ranks["one"][family], FP32_TOLERANCE)


def test_bf16_rows_within_the_pinned_tolerance(two_ranks) -> None:
    assert_rows_match_one_process(two_ranks["good"]["llama-bf16"], two_ranks["one"]["llama-bf16"], BF16_TOLERANCE)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_oracle_holds_on_every_head_of_every_rank(two_ranks, family) -> None:
    """Attention recomputed from the TP rows equals the model's eager attention (fp32), for all 8 heads x 2 layers."""
    assert two_ranks["references"][family].check(two_ranks["good"][family]) == 2 * 8 * len(TEXTS)


def test_sliding_layers_keep_their_window(two_ranks) -> None:
    root = two_ranks["good"]["gemma3"]
    assert {v for name in _configs(root) if name.startswith("l00") for v in _table(root, name)["sliding_window"]} == {8}
    assert {v for name in _configs(root) if name.startswith("l01") for v in _table(root, name)["sliding_window"]} == {None}


def test_the_card_records_k_and_the_world_and_counts_documents_once(two_ranks) -> None:
    front, body = read_front_matter(two_ranks["good"]["llama"] / "README.md")
    model = front["qkcore"]["models"][0]
    assert model["precision"]["tensor_parallel_size"] == 2 and model["precision"]["world_size"] == 2
    assert model["documents"] == len(TEXTS)
    assert "tensor parallel size 2, torchrun processes 2" in body
    manifest = json.loads((two_ranks["good"]["llama"] / "qkcore.json").read_text())
    assert manifest["identity"]["inference"]["tensor_parallel_size"] == 2


def test_kill_9_of_one_rank_then_the_same_command_resumes_byte_identical(two_ranks) -> None:
    base, llama = two_ranks["base"], two_ranks["checkpoints"]["llama"]
    config = _config(base / "killed", llama, {}, texts=LONG_TEXTS, output={
        "data_root": str(base / "killed" / "out"), "commit_every_s": 0, "flush_threshold_mb": 1},
        **{k: dict(v) for k, v in two_ranks["long_sections"].items()})
    results = base / "killed" / "results"
    journal = LocalDataRoot(base / "killed" / "out").rank_staging(1) / JOURNAL_FILE
    launch = subprocess.Popen(_torchrun(2, results, [config]), cwd=base, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, committed = time.monotonic() + 300, 0
    while time.monotonic() < deadline and launch.poll() is None:
        try:
            committed = json.loads(journal.read_text())["state"]["documents"]
        except (OSError, ValueError, KeyError):
            committed = 0
        if committed >= 4:
            break
        time.sleep(0.02)
    os.kill(int((results / "pid1").read_text()), signal.SIGKILL)  # rank 1 alone; torchrun then stops rank 0
    assert launch.wait(timeout=120) != 0, "the run finished before it could be killed; make the corpus longer"
    assert 4 <= committed < len(LONG_TEXTS)

    codes, stderr = _launch(2, base / "killed", [config])
    assert codes == [[0], [0]], stderr[-3000:]
    assert "resuming" in stderr
    killed, clean = base / "killed" / "out", two_ranks["good"]["long"]
    assert _configs(killed) == _configs(clean) != []
    assert all((killed / n / "data.parquet").read_bytes() == (clean / n / "data.parquet").read_bytes()
               for n in _configs(clean))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict[str, Any]:
    """One launch of 4 processes: K = 4 (pure tensor parallelism) and K = 2 with 2 data-parallel groups."""
    base = tmp_path_factory.mktemp("tp4")
    architecture = tiny_architecture("llama", num_key_value_heads=4)
    checkpoint, reference = _checkpoint(base / "llama", architecture, {})
    configs = {k: _config(base / f"k{k}", checkpoint, {}, inference={"tensor_parallel_size": k, "batch_size": 1})
               for k in (4, 2)}
    codes, stderr = _launch(4, base, list(configs.values()))
    one = run_sniff(load_config(_config(base / "one", checkpoint, {}, inference={"batch_size": 1}))).data_root
    return {"codes": codes, "stderr": stderr, "reference": reference, "one": one,
            "roots": {k: Path(load_config(p).output.data_root) for k, p in configs.items()}}


@pytest.mark.parametrize("k", [4, 2])
def test_four_ranks_k4_and_two_groups_of_k2_equal_one_process(four_ranks, k) -> None:
    assert four_ranks["codes"] == [[0, 0]] * 4, four_ranks["stderr"][-3000:]
    root = four_ranks["roots"][k]
    assert_rows_match_one_process(root, four_ranks["one"], FP32_TOLERANCE)
    assert four_ranks["reference"].check(root) == 2 * 8 * len(TEXTS)
    front, _ = read_front_matter(root / "README.md")
    model = front["qkcore"]["models"][0]
    assert model["documents"] == len(TEXTS)  # two groups ran different documents; each counted once
    assert (model["precision"]["tensor_parallel_size"], model["precision"]["world_size"]) == (k, 4)
