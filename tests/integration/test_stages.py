"""The stages called one by one, as an executor other than ``run_sniff`` would call them."""

from __future__ import annotations

from collections import namedtuple

import pytest
from structlog.testing import capture_logs

from qkcore.config import load_config
from qkcore.estimate import make_plan
from qkcore.plugins import make_plugin_manager
from qkcore.sniff import run_sniff
from qkcore.stages.capture import Sniffer
from qkcore.stages.load import load_inputs, load_weights
from qkcore.testing import TEXTS


def test_a_sniffer_is_given_its_model_and_loads_no_weights(tiny_config, monkeypatch) -> None:
    cfg = load_config(tiny_config())
    inputs = load_inputs(cfg, make_plugin_manager())
    model = load_weights(inputs)

    def no_loading(*args, **kwargs):
        raise AssertionError("Sniffer loaded weights")

    monkeypatch.setattr("qkcore.stages.load.load_model", no_loading)
    sniffer = Sniffer(inputs, model)
    assert sniffer.model is model and sniffer.plan.heads


def test_a_capture_reports_when_its_model_was_loaded(tiny_config) -> None:
    result = run_sniff(load_config(tiny_config()))
    assert result.action == "captured" and 0 < result.seconds["loaded"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sniff_warns_about_disk_exactly_when_plan_says_there_is_no_room(tiny_config, monkeypatch, dtype: str) -> None:
    """Both use one estimate; the run knows its vectors' dtype, the plan assumes the widest it may be."""
    cfg = load_config(tiny_config(model={"dtype": dtype}))
    plan = make_plan(cfg, lengths=[cfg.tokenizer.max_length] * len(TEXTS))
    usage = namedtuple("usage", "total used free")

    def run_with(free: float) -> bool:
        monkeypatch.setattr("qkcore.actions.capture.shutil.disk_usage", lambda path: usage(0, 0, free))
        with capture_logs() as logs:
            run_sniff(cfg, restart=True, replace=True)
        return any("enough free disk" in entry["event"] for entry in logs)

    assert not run_with(plan.disk_needed_bytes)  # the plan says there is room: the run agrees
    assert run_with(plan.disk_needed_bytes / 100)


def test_a_rerun_of_a_complete_run_never_parses_the_tokenizer(tiny_config, monkeypatch) -> None:
    """The identity needs the tokenizer's files, not the tokenizer (a GGUF's takes seconds to parse)."""
    cfg = load_config(tiny_config())
    assert run_sniff(cfg).action == "captured"

    def no_parsing(*args, **kwargs):
        raise AssertionError("the tokenizer was parsed")

    monkeypatch.setattr("qkcore.stages.load.load_tokenizer", no_parsing)
    assert run_sniff(cfg).action == "already complete"
    with pytest.raises(AssertionError, match="tokenizer was parsed"):  # a capture parses it before the weights
        load_weights(load_inputs(cfg, make_plugin_manager()))
