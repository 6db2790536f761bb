"""Model and tokenizer sources: devices, dtypes, GGUF files, local directories, identities, and their errors.

Every bad input is one ``qkcore: error:`` line (exit 2) naming the key, before
any forward pass; the identities change exactly when the weights or the
tokenisation could.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

import qkcore.sources.locations as locations
from qkcore.cli import main
from qkcore.config import ConfigError, load_config
from qkcore.errors import QkcoreError
from qkcore.sources.model import (
    load_architecture,
    load_model,
    model_identity,
    precision,
    resolve_device,
)
from qkcore.sources.tokenizer import BYTE_TOKENIZER, byte_tokenizer, load_tokenizer, tokenizer_identity
from tests.conftest import TEXTS, TINY_LLAMA, make_config
from tests.hub_server import hub_server  # noqa: F401 (fixture)

SHA = "0123456789abcdef0123456789abcdef01234567"


def _fails_cleanly(config: Path, capsys, *expected: str) -> str:
    """``qkcore sniff`` exits 2 with exactly one error line holding ``expected`` and writes nothing."""
    assert main(["sniff", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("qkcore: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in errors[0], errors[0]
    assert not (config.parent / "out").exists(), "a failed run must write nothing"
    return errors[0]


def _model_cfg(tmp_path: Path, **model) -> object:
    return load_config(make_config(tmp_path, model=model)).model


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """The tiny random Llama saved as a local model directory (model.safetensors + config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    folder = tmp_path_factory.mktemp("saved") / "tiny-llama"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'qkcore[gguf]')")
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'qkcore[gguf]')")
    from tests.gguf_tiny import write_tiny_llama_gguf

    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


# --------------------------------------------------------------------------- config keys


def test_device_map_takes_a_cuda_index_as_the_original_does(tmp_path) -> None:
    assert _model_cfg(tmp_path, device_map=0).device_map == 0
    with pytest.raises(ConfigError, match=r"model\.device_map.*>= 0"):
        _model_cfg(tmp_path, device_map=-1)


def test_a_gguf_path_alone_names_the_run_after_its_file(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(make_config(tmp_path, model={"name": None, "config": None, "gguf_file": "m/x.Q4_1.gguf"},
                                  tokenizer={"name": None}))
    assert cfg.model.gguf_file == str(tmp_path / "m" / "x.Q4_1.gguf")
    assert cfg.model.name == cfg.tokenizer.name == "x.Q4_1"
    with pytest.raises(ConfigError, match=r"model\.config.*model\.gguf_file.*exclude"):
        _model_cfg(tmp_path, gguf_file="x.gguf")  # make_config sets model.config


# --------------------------------------------------------------------------- devices and dtypes


def test_a_device_this_machine_lacks_is_an_error_not_a_fallback(no_gpu) -> None:
    for device_map in ("cuda", "CUDA:1", 0, "0"):
        with pytest.raises(QkcoreError, match=r"model\.device_map: .* asks for CUDA, but"):
            resolve_device(device_map)
    with pytest.raises(QkcoreError, match=r"model\.device_map: 'mps' asks for an Apple GPU"):
        resolve_device("mps")
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device({"": "cpu"}) == torch.device("cpu")


def test_a_string_that_is_not_a_device_is_named(no_gpu) -> None:
    for device_map in ("gpu0", "cpu:1", "tpu", "cuda:x"):
        with pytest.raises(QkcoreError, match=r"model\.device_map: .* is not a device; use 'auto', 'cpu'"):
            resolve_device(device_map)
    with pytest.raises(QkcoreError, match="only a single device"):
        resolve_device({"model.layers.0": "cpu", "model.layers.1": "disk"})


def test_a_cuda_index_resolves_where_cuda_is_present(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(1) == resolve_device("1") == resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda")
    with pytest.raises(QkcoreError, match="CUDA device 2, but only 2 are visible"):
        resolve_device(2)


def test_mps_is_used_when_present_and_bfloat16_becomes_float16_there(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    mps = resolve_device("auto")
    assert mps == resolve_device("mps") == torch.device("mps")

    bf16 = precision(_model_cfg(tmp_path, dtype="bf16"), mps)
    assert bf16.dtype == torch.float16 and bf16.requested == "bfloat16"
    assert "float16 on MPS" in bf16.note and bf16.card()["effective_dtype"] == "float16"
    fp32 = precision(_model_cfg(tmp_path, dtype="float32"), mps)
    assert fp32.dtype == torch.float32 and fp32.note is None
    # bfloat16 on a CPU or a GPU is kept as asked.
    assert precision(_model_cfg(tmp_path, dtype="bf16"), torch.device("cpu")).dtype == torch.bfloat16


def test_float16_on_a_cpu_warns(tmp_path) -> None:
    model_cfg = _model_cfg(tmp_path, dtype="float16")
    config = load_architecture(model_cfg)
    from transformers import AutoModelForCausalLM

    with capture_logs() as logs:
        model = load_model(model_cfg, config, AutoModelForCausalLM, torch.float16, torch.device("cpu"))
    assert next(model.parameters()).dtype == torch.float16  # kept, as the original does
    warned = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warned) == 1 and "float16 on a CPU" in warned[0]["note"]
    with capture_logs() as logs:
        load_model(model_cfg, config, AutoModelForCausalLM, torch.float32, torch.device("cpu"))
    assert not [entry for entry in logs if entry["log_level"] == "warning"]


def test_cli_refuses_cuda_on_a_machine_without_it(tiny_config, capsys, no_gpu) -> None:
    _fails_cleanly(tiny_config(model={"device_map": "cuda"}), capsys, "model.device_map", "asks for CUDA")


def test_cli_refuses_a_string_that_is_not_a_device(tiny_config, capsys) -> None:
    _fails_cleanly(tiny_config(model={"device_map": "gpu0"}), capsys, "model.device_map", "'gpu0' is not a device")


# --------------------------------------------------------------------------- local directories


def test_a_missing_directory_is_not_called_a_bad_repo_id(tiny_config, capsys, tmp_path) -> None:
    missing = tmp_path / "no" / "such" / "model"
    line = _fails_cleanly(tiny_config(model={"name": str(missing), "config": None}), capsys,
                          "model.name", f"there is no directory '{missing}'", "not a Hub id either")
    assert "Repo id must be" not in line
    _fails_cleanly(tiny_config(tokenizer={"name": "./no/such/tokenizer"}), capsys,
                   "tokenizer.name", "there is no directory", "not a Hub id either")


def _relative_model(tiny_config, monkeypatch, tmp_path) -> Path:
    """A config whose model.name is a relative folder that does not exist (it looks like a Hub id)."""
    monkeypatch.chdir(tmp_path)
    locations._resolve_commit.cache_clear()
    return tiny_config(model={"name": "models/SmolLM2-135M", "config": None}, tokenizer={"name": None})


def test_a_missing_relative_folder_offline_is_no_folder_and_no_cached_repo(tiny_config, capsys, monkeypatch, tmp_path) -> None:
    # Offline (as every test runs): at once, blaming model.name (the tokenizer is the model's), naming the folder.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    config = _relative_model(tiny_config, monkeypatch, tmp_path)
    started = time.monotonic()
    line = _fails_cleanly(config, capsys, f"model.name: there is no folder 'models/SmolLM2-135M' in {tmp_path}",
                          "no Hub repo 'models/SmolLM2-135M' is in the local cache", "HF_HUB_OFFLINE")
    assert "tokenizer.name" not in line and time.monotonic() - started < 20


def test_a_missing_relative_folder_online_is_one_request_when_the_hub_answers_404(
        tiny_config, capsys, monkeypatch, tmp_path, hub_server) -> None:
    config = _relative_model(tiny_config, monkeypatch, tmp_path)
    _fails_cleanly(config, capsys, f"model.name: there is no folder 'models/SmolLM2-135M' in {tmp_path}",
                   "no Hub repo 'models/SmolLM2-135M' (the Hub answered 404)")
    assert [p for _, p in hub_server.requests if "SmolLM2" in p] == ["/api/models/models/SmolLM2-135M"]  # not retried


def test_the_hub_lookup_retries_transient_failures_within_a_bounded_time(
        tiny_config, capsys, monkeypatch, tmp_path, hub_server) -> None:
    config = _relative_model(tiny_config, monkeypatch, tmp_path)
    hub_server.fail(500, times=2)  # then the 404 of a repo that is not there
    _fails_cleanly(config, capsys, "model.name", "no Hub repo 'models/SmolLM2-135M' (the Hub answered 404)")
    assert len([p for _, p in hub_server.requests if "SmolLM2" in p]) == 3
    # A Hub that never answers: 3 tries of at most 1 s each, 3 s in all, then one line.
    monkeypatch.setattr(locations, "HUB_LOOKUP_TIMEOUT_S", 1.0)
    monkeypatch.setattr(locations, "HUB_LOOKUP_BUDGET_S", 3.0)
    hub_server.hang(times=10)
    started = time.monotonic()
    _fails_cleanly(config, capsys, "model.name", "there is no folder 'models/SmolLM2-135M'",
                   "the Hub could not be reached to look for a repo 'models/SmolLM2-135M'", "check the connection")
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no weights", "missing shard"])
def test_damaged_weights_are_one_error_naming_the_file(saved_model, tmp_path, capsys, damage) -> None:
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = ("model.safetensors is truncated or corrupt",)
    elif damage == "garbage":
        weights.write_bytes(b"\x00not a safetensors file" * 64)
        expected = ("model.safetensors is truncated or corrupt",)
    elif damage == "no weights":
        weights.unlink()
        expected = ("no weights in", "found config.json")
    else:
        index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                "model.norm.weight": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        weights.rename(folder / "model-00001-of-00002.safetensors")
        expected = ("missing from the directory", "model-00002-of-00002.safetensors")
    (tmp_path / "run").mkdir()
    config = make_config(tmp_path / "run", model={"name": str(folder), "config": None})
    _fails_cleanly(config, capsys, "model.name", *expected)


def test_a_saved_model_loads_and_equals_the_random_one(saved_model, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = load_config(make_config(tmp_path, model={"name": str(saved_model), "config": None}))
    model = load_model(cfg.model, load_architecture(cfg.model), AutoModelForCausalLM, torch.float32, torch.device("cpu"))
    random_cfg = load_config(make_config(tmp_path)).model
    reference = load_model(random_cfg, load_architecture(random_cfg), AutoModelForCausalLM, torch.float32, torch.device("cpu"))
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)


def test_an_unknown_model_type_names_the_closest_ones(tiny_config, capsys, saved_model, tmp_path) -> None:
    line = _fails_cleanly(tiny_config(architecture={"model_type": "lama", "hidden_size": 8}), capsys,
                          "model.config", "no model_type 'lama'", "closest: llama")
    assert len(line) < 400  # not every known type
    folder = tmp_path / "odd"
    shutil.copytree(saved_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen33"}))
    (tmp_path / "run").mkdir()
    line = _fails_cleanly(make_config(tmp_path / "run", model={"name": str(folder), "config": None}), capsys,
                          "model.name", "no model_type 'qwen33'", "qwen3")
    assert len(line) < 400


def test_an_unknown_rope_type_is_one_error(tiny_config, capsys) -> None:
    overrides = {"rope_scaling": {"rope_type": "yarnn", "factor": 2.0}}
    _fails_cleanly(tiny_config(model={"config_overrides": overrides}), capsys,
                   "model.config_overrides", "unknown rope_type 'yarnn'", "did you mean 'yarn'")


# --------------------------------------------------------------------------- GGUF


def _gguf_cfg(tmp_path: Path, gguf_file: str, name: str | None = None, **sections):
    model = {"name": name, "config": None, "gguf_file": gguf_file}
    tokenizer = {"name": None}
    return load_config(make_config(tmp_path, model=model, tokenizer=tokenizer, **sections))


def test_a_gguf_file_gives_the_model_and_its_tokenizer(tiny_gguf, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = _gguf_cfg(tmp_path, str(tiny_gguf))
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    for _, text in TEXTS:
        assert tokenizer(text)["input_ids"] == byte_tokenizer()(text)["input_ids"]
    config = load_architecture(cfg.model)
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == ("llama", 3, 2)
    model = load_model(cfg.model, config, AutoModelForCausalLM, torch.float32, torch.device("cpu"))
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # dense, dequantized
    random_cfg = load_config(make_config(tmp_path)).model
    reference = load_model(random_cfg, load_architecture(random_cfg), AutoModelForCausalLM, torch.float32, torch.device("cpu"))
    for name, tensor in reference.state_dict().items():
        # Q8_0 keeps 8 bits per weight with one scale per 32: |error| <= scale / 2.
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=tensor.abs().max().item() / 127)


def test_gguf_file_inside_the_model_folder_or_an_installed_package(tiny_gguf, tmp_path, monkeypatch) -> None:
    folder_cfg = _gguf_cfg(tmp_path, tiny_gguf.name, name=str(tiny_gguf.parent))
    package = tmp_path / "site" / "fake_weights_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    shutil.copy(tiny_gguf, package / tiny_gguf.name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    package_cfg = _gguf_cfg(tmp_path, f"package:fake_weights_pkg/{tiny_gguf.name}")
    assert package_cfg.model.name == "tiny-llama.Q8_0"
    for cfg in (folder_cfg, package_cfg):
        assert load_architecture(cfg.model).num_hidden_layers == 3
        assert model_identity(cfg.model, None)["sha256"] == model_identity(_gguf_cfg(tmp_path, str(tiny_gguf)).model, None)["sha256"]


def test_a_missing_gguf_is_one_error(tiny_config, tmp_path, capsys) -> None:
    for model, expected in (
        ({"name": None, "gguf_file": str(tmp_path / "absent.gguf")}, "no such file"),
        ({"name": str(tmp_path), "gguf_file": "absent.gguf"}, "no file 'absent.gguf' in the model directory"),
        ({"name": None, "gguf_file": "package:no_such_pkg_qk/x.gguf"}, "package 'no_such_pkg_qk' is not installed"),
        ({"name": None, "gguf_file": "package:pytest/absent.gguf"}, "has no file 'absent.gguf'"),
    ):
        _fails_cleanly(tiny_config(model={**model, "config": None}, tokenizer={"name": None}), capsys,
                       "model.gguf_file", expected)


def test_a_gguf_of_an_unsupported_architecture_is_one_error(tiny_config, tmp_path, capsys) -> None:
    pytest.importorskip("gguf")
    from tests.gguf_tiny import write_header_only_gguf

    path = write_header_only_gguf(tmp_path / "encoder.gguf", "bert")
    _fails_cleanly(tiny_config(model={"name": None, "config": None, "gguf_file": str(path)}, tokenizer={"name": None}),
                   capsys, "model.gguf_file", "'bert' model", "cannot load from GGUF", "llama")


def test_gguf_without_the_gguf_package_says_how_to_install_it(tiny_gguf, tiny_config, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails, as if not installed
    _fails_cleanly(tiny_config(model={"name": None, "config": None, "gguf_file": str(tiny_gguf)}, tokenizer={"name": None}),
                   capsys, "model.gguf_file", "needs gguf", "qkcore[gguf]")


@pytest.mark.slow
def test_capture_from_a_gguf_model_reproduces_its_eager_attention(tiny_gguf, tmp_path) -> None:
    from qkcore.sniff import run_sniff
    from transformers import AutoModelForCausalLM
    from qkcore.testing import assert_rows_match_eager

    cfg = _gguf_cfg(tmp_path, str(tiny_gguf), inference={"batch_size": 1})
    result = run_sniff(cfg)
    model = load_model(cfg.model, load_architecture(cfg.model), AutoModelForCausalLM, torch.float32, torch.device("cpu"))
    model.set_attn_implementation("eager")
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    with torch.no_grad():
        attentions = {
            eid: [a[0] for a in model.model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]),
                                            use_cache=False, output_attentions=True).attentions]
            for eid, text in TEXTS
        }
    n_q, n_kv, head_dim = TINY_LLAMA["num_attention_heads"], TINY_LLAMA["num_key_value_heads"], TINY_LLAMA["head_dim"]
    checked = assert_rows_match_eager(result.data_root, attentions, scaling=lambda layer: head_dim**-0.5,
                                      key_head=lambda q: q // (n_q // n_kv))
    assert checked == TINY_LLAMA["num_hidden_layers"] * n_q * len(TEXTS)


# --------------------------------------------------------------------------- identities


def test_random_identity_changes_exactly_with_what_changes_the_weights(tmp_path) -> None:
    def identity(architecture=None, **model):
        cfg = load_config(make_config(tmp_path, architecture, model=model))
        return model_identity(cfg.model, load_architecture(cfg.model))

    base = identity()
    assert base["source"] == "random" and base["torch"] == torch.__version__ and base["device"] == "cpu"
    json.dumps(base)
    assert identity() == base
    assert identity(name="another/label", attn_implementation="eager") == base  # labels and kernels: same weights
    assert identity(init_seed=1) != base
    assert identity(dtype="bf16") != base
    assert identity({**TINY_LLAMA, "intermediate_size": 96}) != base


def test_local_identity_hashes_the_weight_files_once(saved_model, tmp_path) -> None:
    cfg = load_config(make_config(tmp_path, model={"name": str(saved_model), "config": None})).model
    cache: dict[str, str] = {}
    identity = model_identity(cfg, None, cache)
    assert identity["source"] == "local" and set(identity["files"]) == {"model.safetensors", "config.json"}
    import hashlib

    assert identity["files"]["model.safetensors"] == hashlib.sha256((saved_model / "model.safetensors").read_bytes()).hexdigest()
    assert len(cache) == 2 and all(key.startswith(str(saved_model.resolve())) for key in cache)
    # The cache is used: a planted digest comes back without rehashing.
    planted = {key: ("f" * 64 if "safetensors" in key else value) for key, value in cache.items()}
    assert model_identity(cfg, None, planted)["files"]["model.safetensors"] == "f" * 64

    # Through a symlink, or moved elsewhere: the same identity. Other weights: another.
    link = tmp_path / "link"
    link.symlink_to(saved_model)
    assert model_identity(load_config(make_config(tmp_path, model={"name": str(link), "config": None})).model, None) == identity
    changed = tmp_path / "changed"
    shutil.copytree(saved_model, changed)
    from safetensors.torch import load_file, save_file

    tensors = load_file(changed / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    other = model_identity(load_config(make_config(tmp_path, model={"name": str(changed), "config": None})).model, None)
    assert other["files"]["config.json"] == identity["files"]["config.json"]
    assert other["files"]["model.safetensors"] != identity["files"]["model.safetensors"]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An offline Hub cache recording that 'owner/model' main is at ``SHA``."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    (cache / "models--owner--model" / "refs").mkdir(parents=True)
    (cache / "models--owner--model" / "refs" / "main").write_text(SHA)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    locations._resolve_commit.cache_clear()
    yield cache
    locations._resolve_commit.cache_clear()


def test_hub_identity_is_the_commit_the_revision_resolves_to(hub_cache, tmp_path) -> None:
    cfg = load_config(make_config(tmp_path, model={"name": "owner/model", "config": None}, tokenizer={"name": None}))
    assert model_identity(cfg.model, None) == {"source": "hub", "repo": "owner/model", "commit": SHA}
    assert tokenizer_identity(cfg.tokenizer, cfg.model) == {"source": "hub", "repo": "owner/model", "commit": SHA}
    pinned = "f" * 40  # a commit hash needs no lookup
    cfg.model.revision = pinned
    assert model_identity(cfg.model, None)["commit"] == pinned
    cfg.model.revision = "a-branch-never-downloaded"
    with pytest.raises(QkcoreError, match=r"model\.revision: cannot resolve .*'owner/model'.*pin the revision to a 40-character commit hash"):
        model_identity(cfg.model, None)
    cfg = load_config(make_config(tmp_path, model={"name": "owner/uncached", "config": None}))
    with pytest.raises(QkcoreError, match="pin the revision"):
        model_identity(cfg.model, None)


def test_gguf_identity_records_the_file_its_quantisation_and_the_dequantisation(tiny_gguf, tmp_path) -> None:
    import hashlib

    cfg = _gguf_cfg(tmp_path, str(tiny_gguf))
    identity = model_identity(cfg.model, None)
    assert identity == {
        "source": "gguf",
        "file": tiny_gguf.name,
        "sha256": hashlib.sha256(tiny_gguf.read_bytes()).hexdigest(),
        "quantization": "Q8_0",
        "tensor_types": identity["tensor_types"],
        "dequantized_to": "float32",
    }
    assert identity["tensor_types"]["Q8_0"] == 1 + 3 * 7 + 1 and identity["tensor_types"]["F32"] == 3 * 2 + 1
    cfg.model.dtype = "bfloat16"
    assert model_identity(cfg.model, None)["dequantized_to"] == "bfloat16"
    assert tokenizer_identity(cfg.tokenizer, cfg.model) == {"source": "gguf", "file": tiny_gguf.name, "sha256": identity["sha256"]}


def test_tokenizer_identity_of_the_builtin_and_of_a_local_directory(tmp_path) -> None:
    cfg = load_config(make_config(tmp_path))
    assert tokenizer_identity(cfg.tokenizer, cfg.model) == {"source": "builtin", "name": BYTE_TOKENIZER, "version": 1}
    folder = tmp_path / "tok"
    byte_tokenizer().save_pretrained(folder)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    cfg.tokenizer.name = str(folder)
    identity = tokenizer_identity(cfg.tokenizer, cfg.model)
    assert identity["source"] == "local" and "tokenizer.json" in identity["files"]
    assert "chat_template.jinja" not in identity["files"]  # does not change how a text is tokenised
    assert load_tokenizer(cfg.tokenizer, cfg.model)("abc")["input_ids"] == byte_tokenizer()("abc")["input_ids"]


def test_a_truncated_file_in_the_hub_cache_is_one_error(hub_cache, saved_model, tiny_config, capsys) -> None:
    """A download cut short: the cached snapshot of 'owner/model' has half its safetensors."""
    snapshot = hub_cache / "models--owner--model" / "snapshots" / SHA
    shutil.copytree(saved_model, snapshot)
    weights = snapshot / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fails_cleanly(tiny_config(model={"name": "owner/model", "config": None}), capsys,
                   "model.name", "the weights of 'owner/model' are truncated or corrupt")


def test_a_hub_model_loads_from_the_commit_its_identity_names(hub_cache, saved_model, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    shutil.copytree(saved_model, hub_cache / "models--owner--model" / "snapshots" / SHA)
    cfg = load_config(make_config(tmp_path, model={"name": "owner/model", "config": None}))
    assert model_identity(cfg.model, None)["commit"] == SHA
    model = load_model(cfg.model, load_architecture(cfg.model), AutoModelForCausalLM, torch.float32, torch.device("cpu"))
    local = load_config(make_config(tmp_path, model={"name": str(saved_model), "config": None})).model
    reference = load_model(local, load_architecture(local), AutoModelForCausalLM, torch.float32, torch.device("cpu"))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
