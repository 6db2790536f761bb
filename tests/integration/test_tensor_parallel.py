"""Tensor-parallel capture (``inference.tensor_parallel_size``): the checks and pieces that need no torchrun.

The runs under torchrun are in ``test_tensor_parallel_torchrun.py`` (slow).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from qkcore.card import render_card
from qkcore.cli import main
from qkcore.config import ConfigError, load_config
from qkcore.distributed import Ranks
from qkcore.identity import run_identity, run_key
from qkcore.layers import AttentionLayer
from qkcore.tensor_parallel import (
    LayerShard,
    check_architecture,
    check_settings,
    group_leaders,
    group_start,
    layer_shard,
    with_groups,
)
from qkcore.testing import tiny_architecture


def _cfg(tiny_config, **sections):
    return load_config(tiny_config(**sections))


def test_k_above_1_without_torchrun_is_one_error_before_anything_is_written(tiny_config, tmp_path, capsys) -> None:
    config = tiny_config(inference={"tensor_parallel_size": 2}, output={"data_root": str(tmp_path / "out")})
    assert main(["sniff", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkcore: error:")
    assert "inference.tensor_parallel_size: 2" in err[0] and "torchrun --nproc-per-node 2" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("sections", "world", "words"),
    [
        ({}, 3, ["does not divide the 3 torchrun processes", "--nproc-per-node 2 or 4"]),
        # An index is one rank's device: refused on every rank alike (rank 1's own device included).
        ({"model": {"device_map": "cuda:1"}}, 2, ["model.device_map: 'cuda:1'", "own device"]),
        ({"model": {"device_map": 0}}, 2, ["model.device_map: 0"]),
        ({"model": {"device_map": {"": "cpu"}}}, 2, ["model.device_map: {'': 'cpu'}"]),
        ({"capture": {"capture_pre_rope": True}}, 2, ["capture.capture_pre_rope"]),
        ({"model": {"config": None, "gguf_file": "m.gguf"}}, 2, ["GGUF"]),
    ],
)
def test_settings_that_cannot_go_with_k_are_refused(tiny_config, tmp_path, sections, world, words) -> None:
    model = {"config": None, "name": str(tmp_path), **sections.get("model", {})}
    cfg = _cfg(tiny_config, **{**sections, "model": model, "inference": {"tensor_parallel_size": 2}})
    with pytest.raises(ConfigError) as error:
        check_settings(cfg, world)
    for word in words:
        assert word in str(error.value)


def test_random_weights_cannot_be_sharded(tiny_config) -> None:
    cfg = _cfg(tiny_config, inference={"tensor_parallel_size": 2})
    with pytest.raises(ConfigError, match="model.config .random weights. has none: save the model"):
        check_settings(cfg, 2)


@pytest.mark.parametrize("device_map", ["auto", "cuda", "cpu", None])
def test_the_ranks_own_device_is_accepted(tiny_config, tmp_path, device_map) -> None:
    cfg = _cfg(tiny_config, model={"config": None, "name": str(tmp_path), "device_map": device_map},
               inference={"tensor_parallel_size": 2})
    check_settings(cfg, 4)
    assert with_groups(Ranks(rank=1, world_size=4, local_rank=1), cfg).tensor_parallel_size == 2


def test_k_must_divide_the_key_value_heads(tiny_config, tmp_path) -> None:
    cfg = _cfg(tiny_config, model={"config": None, "name": str(tmp_path)}, inference={"tensor_parallel_size": 4})
    architecture = AutoConfig.for_model(**tiny_architecture("llama"))  # 8 query heads over 2 key/value heads
    with pytest.raises(ConfigError, match=r"does not divide the model's num_key_value_heads \(2\).*\[1, 2\]"):
        check_architecture(cfg, architecture, "llama")


def test_a_family_without_a_tp_plan_is_named_with_the_way_out(tiny_config, tmp_path) -> None:
    cfg = _cfg(tiny_config, model={"config": None, "name": str(tmp_path)}, inference={"tensor_parallel_size": 2})
    with pytest.raises(ConfigError) as error:
        check_architecture(cfg, AutoConfig.for_model("mllama"), "mllama")
    message = str(error.value)
    assert "model_type 'mllama' has no tensor-parallel plan" in message and "model.device_map: auto" in message
    check_architecture(cfg, AutoConfig.for_model("gemma3"), "gemma3")  # the VLM's text config carries the plan


def test_groups_take_whole_batches_like_single_ranks() -> None:
    """N=4, K=2: ranks 0-1 run batches 0, 2, 4; ranks 2-3 batches 1, 3, 5 (batch_size 2)."""
    owned = {
        rank: [d for d in range(12) if Ranks(rank, 4, rank, tensor_parallel_size=2).owns(d, 2)] for rank in range(4)
    }
    assert owned[0] == owned[1] == [0, 1, 4, 5, 8, 9]
    assert owned[2] == owned[3] == [2, 3, 6, 7, 10, 11]
    assert [d for d in range(6) if Ranks(1, 2, 1, tensor_parallel_size=2).owns(d, 2)] == list(range(6))


def test_merging_counts_each_groups_documents_once() -> None:
    assert group_leaders(["g0r0", "g0r1", "g1r0", "g1r1"], Ranks(0, 4, tensor_parallel_size=2)) == ["g0r0", "g1r0"]
    assert group_leaders(["r0", "r1"], Ranks(0, 2)) == ["r0", "r1"]
    assert group_start(Ranks(), True, 7) == 7 and group_start(Ranks(), False, 7) is None


def test_tensor_parallel_size_is_part_of_the_identity_and_k1_keeps_earlier_keys(tiny_config) -> None:
    fingerprints = dict(dataset={"sha256": "d"}, model={"source": "random"}, tokenizer={"source": "bytes"}, device_type="cpu")
    one = run_identity(_cfg(tiny_config), **fingerprints)
    assert "tensor_parallel_size" not in one["inference"]
    assert one == run_identity(_cfg(tiny_config, inference={"tensor_parallel_size": 1}), **fingerprints)
    two = run_identity(_cfg(tiny_config, inference={"tensor_parallel_size": 2}), **fingerprints)
    assert two["inference"]["tensor_parallel_size"] == 2 and run_key(two) != run_key(one)


def _layer(module: torch.nn.Module) -> AttentionLayer:
    return AttentionLayer(0, module, "full", None, num_query_heads=4, num_key_value_heads=2, head_dim=8)


def test_a_projection_left_whole_is_not_taken_for_a_shard() -> None:
    module = SimpleNamespace(q_proj=torch.nn.Linear(16, 32), k_proj=torch.nn.Linear(16, 16))
    assert layer_shard(_layer(module), 1) == LayerShard(range(0, 4), range(0, 2))
    with pytest.raises(Exception, match="loaded whole on every rank"):
        layer_shard(_layer(module), 2)


def test_the_card_records_the_parallelism() -> None:
    from tests.unit.test_card import make_model

    entry = make_model(precision={"dtype": "float32", "batch_size": 2, "tensor_parallel_size": 2, "world_size": 4})
    assert "batch size 2, tensor parallel size 2, torchrun processes 4" in render_card(entry, {})


class _Gathered(Ranks):
    """Ranks whose gather returns fixed values (what each rank of the run would contribute)."""

    def gather(self, value):  # type: ignore[override]
        return self.values  # type: ignore[attr-defined]


def _ranks(rank: int, values: list) -> Ranks:
    ranks = _Gathered(rank, len(values), rank, tensor_parallel_size=2)
    object.__setattr__(ranks, "values", values)
    return ranks


def test_a_group_resumes_from_its_least_advanced_member() -> None:
    """A rank killed between the members' commits: the group reruns the missing batches together.

    (Seen in practice: after kill -9 of rank 1, rank 0 had committed one batch more.)
    """
    states = [(True, 8), (True, 7), (True, 3), (True, 3)]
    assert [group_start(_ranks(r, states), *states[r]) for r in range(4)] == [7, 7, 3, 3]
    # A member that finished still runs the others' forwards; a group all finished runs none.
    states = [(False, 48), (True, 30), (False, 47), (False, 47)]
    assert [group_start(_ranks(r, states), *states[r]) for r in range(4)] == [30, 30, None, None]
