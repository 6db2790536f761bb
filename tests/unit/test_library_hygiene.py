"""qkcore leaves the libraries it uses as it found them: transformers' attention registries after a
capture, huggingface_hub's client through its public API, progress bars through the libraries' switches."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
from transformers.masking_utils import AttentionMaskInterface

import qkcore
from qkcore.generic import AttentionInterfaceHandle
from qkcore.testing import TINY_LLAMA

CORE = Path(qkcore.__file__).parent


def _tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    settings = {key: value for key, value in TINY_LLAMA.items() if key != "model_type"}
    return AutoModelForCausalLM.from_config(LlamaConfig(**settings), attn_implementation="sdpa").eval()


def _ours() -> set[str]:
    """Names qkcore registered in transformers' attention and mask registries."""
    names = set(AttentionInterface._global_mapping) | set(AttentionMaskInterface._global_mapping)
    return {name for name in names if name.startswith(AttentionInterfaceHandle.PREFIX)}


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
        self.calls.append(int(module.layer_idx))


def _forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 9)[None]).logits


def test_captures_one_after_the_other_leave_the_registries_and_the_model_as_they_were() -> None:
    before = _ours()
    model = _tiny_model(0)
    expected = _forward(model)
    for _ in range(2):
        recorder = _Recorder()
        handle = AttentionInterfaceHandle.install(model, recorder)
        torch.testing.assert_close(_forward(model), expected)  # the real kernel still runs
        handle.remove()
        assert recorder.calls == [0, 1, 2]
        assert model.config._attn_implementation == "sdpa"
        assert _ours() == before  # nothing left registered
    _forward(model)
    assert recorder.calls == [0, 1, 2]  # a removed capture sees nothing


def test_interleaved_captures_each_see_only_their_own_model() -> None:
    """Before: one process-global callback; the second install took the first model's rows."""
    before = _ours()
    first, second = _tiny_model(0), _tiny_model(1)
    seen_first, seen_second = _Recorder(), _Recorder()
    handle_first = AttentionInterfaceHandle.install(first, seen_first)
    handle_second = AttentionInterfaceHandle.install(second, seen_second)
    _forward(first)
    assert (seen_first.calls, seen_second.calls) == ([0, 1, 2], [])
    handle_first.remove()
    _forward(second)
    _forward(first)
    assert (seen_first.calls, seen_second.calls) == ([0, 1, 2], [0, 1, 2])
    assert first.config._attn_implementation == "sdpa"
    handle_second.remove()
    assert second.config._attn_implementation == "sdpa"
    assert _ours() == before


def test_a_failed_install_registers_nothing(monkeypatch) -> None:
    before = _ours()
    model = _tiny_model(0)

    def refuse(name: str) -> None:
        raise ValueError(f"cannot use {name}")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    with pytest.raises(ValueError, match="cannot use qkcore_"):
        AttentionInterfaceHandle.install(model, _Recorder())
    assert _ours() == before


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_hub_uses_only_huggingface_hubs_public_client_api() -> None:
    imported = _imports(CORE / "hub.py")
    private = {name for name in imported if name.startswith("huggingface_hub") and "._" in name}
    assert not private, private


def test_hub_steps_bound_requests_and_keep_huggingface_hubs_request_hooks() -> None:
    import httpx2
    from huggingface_hub.utils import get_session, set_client_factory

    from qkcore import hub

    original = tuple(get_session().event_hooks["request"])  # huggingface_hub's own (offline check, request ids)

    def marker(request: httpx2.Request) -> None:
        """A stand-in for a request hook of the client qkcore replaces."""

    set_client_factory(lambda: httpx2.Client(event_hooks={"request": [marker]}))
    try:
        with hub._hub_client(7.0):
            session = get_session()
            assert isinstance(session, hub._HubClient)
            assert session.event_hooks["request"] == [marker]  # the replaced client's hooks are kept
            assert hub._STEP_LIMIT_S == [7.0]
        assert hub._STEP_LIMIT_S == [None]  # outside a step: huggingface_hub's default behaviour
        with hub._hub_client(3.0):
            assert get_session() is session  # installed once, not swapped per step
    finally:
        set_client_factory(lambda: hub._HubClient(original))


def test_logs_switches_library_bars_with_the_libraries_own_switches(monkeypatch) -> None:
    from transformers.utils import logging as transformers_logging

    from qkcore import logs

    assert "unittest.mock" not in _imports(CORE / "logs.py") and "unittest" not in _imports(CORE / "logs.py")
    monkeypatch.setitem(logs._state, "library_bars", False)
    transformers_logging.enable_progress_bar()
    with logs.library_bars_off():
        assert not transformers_logging.is_progress_bar_enabled()
    assert transformers_logging.is_progress_bar_enabled()


def test_only_the_sweep_imports_ray_and_only_when_it_runs() -> None:
    """Ray is the extra ``qkcore[ray]``: no module outside ``qkcore.sweep`` imports it, and none at module level."""
    offenders = []
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if not any(name == "ray" or name.startswith("ray.") for name in names):
                continue
            at_top = node in tree.body
            if at_top or path.parent.name != "sweep":
                offenders.append(f"{path.relative_to(CORE)}:{node.lineno}")
    assert offenders == []
