"""Shared pieces of the family tests: the eager reference run and small readers.

Every family test builds the same tiny random model twice: once through
``run_sniff`` (the capture under test) and once here, through the same plugin's
model class and backbone, in eager attention with ``output_attentions=True``
(the independent reference the oracle compares against).
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from qkcore.config import load_config
from qkcore.plugins import Family, make_plugin_manager, resolve_family
from qkcore.sources.model import load_architecture, load_model
from qkcore.sources.tokenizer import load_tokenizer
from tests.conftest import TEXTS, make_config


@dataclass
class EagerReference:
    """A tiny model in eager mode and each document's per-layer attention probabilities."""

    model: torch.nn.Module
    backbone: torch.nn.Module
    family: Family
    attentions: dict[Any, list[torch.Tensor]]  # example id -> [(heads, seq, seq) per attention call]
    inputs: dict[Any, torch.Tensor]  # example id -> (1, seq) input ids


def eager_reference(
    tmp_path: Path, architecture: dict[str, Any], texts=TEXTS, **model_section: Any
) -> EagerReference:
    """Build ``architecture`` as the run would (plugin's class, seed), switch to eager, record attentions."""
    cfg = load_config(make_config(tmp_path, model={"config": architecture, **model_section}))
    config = load_architecture(cfg.model)
    family = resolve_family(make_plugin_manager(), config.model_type)
    model_class = family.hooks.qkcore_model_class(config=config)
    model = load_model(cfg.model, config, model_class, torch.float32, torch.device("cpu"))
    model.set_attn_implementation("eager")
    backbone = family.hooks.qkcore_backbone(model=model)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    attentions, inputs = {}, {}
    with torch.no_grad():
        for example_id, text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            out = backbone(input_ids=ids, use_cache=False, output_attentions=True)
            attentions[example_id] = [a[0] for a in out.attentions]
            inputs[example_id] = ids
    return EagerReference(model, backbone, family, attentions, inputs)


def sniff(tmp_path: Path, architecture: dict[str, Any], **sections: dict[str, Any]):
    """Run the capture on ``architecture`` in a fresh folder under ``tmp_path``; return its ``SniffResult``."""
    from qkcore.sniff import run_sniff

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    return run_sniff(load_config(make_config(folder, architecture, **sections)))


def sliding_window_column(root: Path, config: str) -> set:
    """The distinct values of the ``sliding_window`` column of one written config."""
    return set(pq.read_table(Path(root) / config / "data.parquet", columns=["sliding_window"]).column(0).to_pylist())


def expected_sampled_configs(
    eligible_layers: list[int], num_q: int, num_kv: int, count: int, seed: int
) -> list[str]:
    """Config names for ``count`` query heads sampled as the protocol defines it, plus their GQA key heads.

    Written independently of ``qkcore.heads``: candidates layer-major, heads ascending,
    ``random.Random(seed).sample``; key head = ``q // (num_q // num_kv)``.
    """
    candidates = [(layer, head) for layer in eligible_layers for head in range(num_q)]
    chosen = random.Random(seed).sample(candidates, count) if len(candidates) > count else candidates
    names = {f"l{layer:02d}h{head:02d}q" for layer, head in chosen}
    names |= {f"l{layer:02d}h{head // (num_q // num_kv):02d}k" for layer, head in chosen}
    return sorted(names)


def plugins_list_line(capsys, name: str) -> str:
    """The ``qkcore plugins list`` line of plugin ``name`` (run in-process)."""
    from qkcore.cli import main

    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    return next(line for line in out.splitlines() if line.split()[:1] == [name])
