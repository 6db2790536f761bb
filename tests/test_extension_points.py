"""Third-party extension points work through the plugin manager alone."""

from __future__ import annotations

import types

import pyarrow.parquet as pq
import torch

from qkcore import hookimpl
from qkcore.config import load_config
from qkcore.plugins import make_plugin_manager
from qkcore.samplers import Sampler
from qkcore.sniff import run_sniff


class EveryThirdSampler(Sampler):
    """Keeps positions 0, 3, 6, ... (p_keep 1 or 0); bucket = position // min_bucket_size."""

    name = "every_third"

    def buckets(self, positions: torch.Tensor) -> torch.Tensor:
        return positions // self.min_bucket_size

    def keep_probability(self, positions: torch.Tensor) -> torch.Tensor:
        return (positions % 3 == 0).to(torch.float64)

    def p_keep_rule(self) -> str:
        return "p_keep = 1 if position % 3 == 0 else 0"


def test_a_sampler_from_another_plugin_drives_a_sniff(tiny_config) -> None:
    plugin = types.ModuleType("qk_plugin_every_third")

    @hookimpl
    def qkcore_samplers():
        return {"every_third": EveryThirdSampler}

    plugin.qkcore_samplers = qkcore_samplers
    pm = make_plugin_manager()
    pm.register(plugin, name="every_third")
    cfg = load_config(tiny_config(capture={"sampler": {"type": "every_third"}, "layers": [1]}))
    result = run_sniff(cfg, pm)
    table = pq.read_table(result.data_root / "l01h00q" / "data.parquet").to_pydict()
    assert table["position"] and all(p % 3 == 0 for p in table["position"])
    assert table["bucket"] == [p // cfg.capture.min_bucket_size for p in table["position"]]
