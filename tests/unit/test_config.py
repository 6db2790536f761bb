"""Tests for qkcore.config: loading, validation errors, legacy keys, overrides, paths."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from qkcore.config import (
    LEGACY_KEYS,
    ConfigError,
    QkcoreConfigWarning,
    SniffConfig,
    config_to_dict,
    load_config,
    resolve_dtype,
)

# The sniff-qk example config; must load unchanged.
SNIFF_QK_YAML = """\
dataset: {path: viktoroo/longbench-pro-128k-plus, name: null, split: test, text_column: text, id_column: id, max_samples: null}
model:
  name: Qwen/Qwen3-8B
  revision: main
  dtype: bfloat16
  device_map: auto
  trust_remote_code: false
  config_overrides:
    rope_scaling: {rope_type: yarn, factor: 4.0, original_max_position_embeddings: 32768}
tokenizer: {name: Qwen/Qwen3-8B, max_length: 131072, padding: longest}
inference: {batch_size: 1, autocast_dtype: bfloat16}
capture:
  capture_queries: true
  capture_keys: true
  layers: null
  heads: null
  head_sampling: {count: 300, seed: 0}
  full_attention_only: true
  capture_pre_rope: false
  min_bucket_size: 2048
  sampler: {type: uniform, base_rate: 10.0}
output: {data_root: data/attention-plasticity, readme_path: README.md, hf_repo_id: viktoroo/sniffed-qk, hf_branch: qwen3-8b-longbench-pro-128k-plus}
"""

MINIMAL_YAML = "dataset: {path: some/dataset}\nmodel: {name: some/model}\n"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test from tmp_path so cwd-relative paths are predictable."""
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(path: Path, overrides: tuple[str, ...] = (), env: dict[str, str] | None = None) -> SniffConfig:
    """load_config with an empty environment unless one is given (no leakage from os.environ)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", QkcoreConfigWarning)  # unexpected warnings fail tests
        return load_config(path, overrides, env={} if env is None else env)


def test_sniff_qk_example_loads(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, SNIFF_QK_YAML))
    assert cfg.source == tmp_path / "run.yaml"
    assert cfg.dataset.path == "viktoroo/longbench-pro-128k-plus"  # hub id, not a local path
    assert cfg.dataset.split == "test" and cfg.dataset.id_column == "id"
    assert cfg.model.name == "Qwen/Qwen3-8B" and cfg.model.dtype == "bfloat16"
    assert cfg.model.config_overrides == {
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    }
    assert cfg.tokenizer.max_length == 131072
    assert cfg.inference.autocast_dtype == "bfloat16"
    assert cfg.capture.head_sampling is not None and cfg.capture.head_sampling.count == 300
    assert cfg.capture.full_attention_only is True and cfg.capture.min_bucket_size == 2048
    assert (cfg.capture.sampler.type, cfg.capture.sampler.base_rate) == ("uniform", 10.0)
    assert cfg.output.data_root == tmp_path / "data" / "attention-plasticity"
    assert cfg.output.readme_path == Path("README.md")
    assert cfg.output.hf_branch == "qwen3-8b-longbench-pro-128k-plus"


def test_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL_YAML))
    assert cfg.dataset.split == "train" and cfg.dataset.text_column == "text"
    assert cfg.dataset.streaming is False and cfg.dataset.max_samples is None
    assert cfg.model.dtype == "float16" and cfg.model.device_map == "auto"
    assert cfg.model.attn_implementation == "sdpa" and cfg.model.init_seed == 0
    assert cfg.tokenizer.name == "some/model"  # defaults to model.name
    assert (cfg.tokenizer.max_length, cfg.tokenizer.padding_side) == (4096, "right")
    assert cfg.inference.batch_size == 1 and cfg.inference.autocast_dtype == "float16"
    assert cfg.capture.sampler.type == "log_uniform" and cfg.capture.sampler.base_rate == 1.0
    assert cfg.capture.min_bucket_size == 128 and cfg.capture.head_sampling is None
    assert cfg.output.data_root == tmp_path / "data"
    assert cfg.output.flush_threshold_mb == 256.0 and cfg.output.write_batch_size is None


def test_empty_section_means_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL_YAML + "capture:\n"))
    assert cfg.capture.min_bucket_size == 128


def test_config_to_dict_is_json_and_excludes_source(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, SNIFF_QK_YAML))
    data = config_to_dict(cfg)
    assert "source" not in data
    assert json.loads(json.dumps(data)) == data
    assert data["output"]["data_root"] == str(tmp_path / "data" / "attention-plasticity")


@pytest.mark.parametrize(
    ("extra", "key", "hint"),
    [
        ("foo: 1\n", "foo", None),
        ("capture: {samplr: {type: all}}\n", "capture.samplr", "capture.sampler"),
        ("capture: {sampler: {typ: all}}\n", "capture.sampler.typ", "capture.sampler.type"),
    ],
)
def test_unknown_key_is_error_naming_file_and_key(tmp_path: Path, extra: str, key: str, hint: str | None) -> None:
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, MINIMAL_YAML + extra))
    msg = str(exc.value)
    assert msg.startswith(f"{tmp_path / 'run.yaml'}: unknown key '{key}'")
    assert (f"did you mean '{hint}'" in msg) if hint else ("did you mean" not in msg)


def test_legacy_keys_warn_and_load(tmp_path: Path) -> None:
    yaml_text = MINIMAL_YAML + (
        "capture: {queue_size: 16, max_rows_per_batch: 1000, capture_token_strings: true}\n"
        "inference: {mps_cleanup_every_batches: 4, distributed: true, backend: nccl}\n"
        "output: {write_batch_size: 5000}\n"
    )
    with pytest.warns(QkcoreConfigWarning) as record:
        cfg = load_config(write(tmp_path, yaml_text), env={})
    messages = [str(w.message) for w in record if issubclass(w.category, QkcoreConfigWarning)]
    for key in LEGACY_KEYS:
        assert any("run.yaml" in m and f"'{key}'" in m for m in messages), key
    assert len(messages) == len(LEGACY_KEYS)  # write_batch_size is not legacy: no warning
    assert cfg.capture.max_rows_per_batch == 1000
    assert cfg.inference.mps_cleanup_every_batches == 4
    assert cfg.output.write_batch_size == 5000
    assert "queue_size" not in config_to_dict(cfg)["capture"]


def test_legacy_key_with_false_value_does_not_warn(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL_YAML + "capture: {capture_token_strings: false}\n"))
    assert cfg.capture.capture_token_strings is False


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"capture": {"min_bucket_size": 0}},
            "run.yaml: capture.min_bucket_size: must be an integer >= 1 (got 0)",
        ),
        ({"model": {"name": "m", "dtype": "fp8"}}, "run.yaml: model.dtype: unknown dtype 'fp8'"),
        ({"inference": {"autocast_dtype": "int8"}}, "run.yaml: inference.autocast_dtype: unknown dtype"),
        ({"capture": {"layers": [0, "x"]}}, "run.yaml: capture.layers.1: Input should be a valid integer"),
        ({"dataset": {"path": "d", "max_samples": -1}}, "run.yaml: dataset.max_samples: Input should be greater than or equal to 0"),
        ({"capture": {"head_sampling": {"seed": 1}}}, "run.yaml: capture.head_sampling.count: Field required"),
        ({"tokenizer": {"padding_side": "middle"}}, "run.yaml: tokenizer.padding_side: Input should be 'left' or 'right'"),
    ],
)
def test_bad_value_error_names_key(tmp_path: Path, sections: dict[str, Any], expected: str) -> None:
    text = yaml.safe_dump({"dataset": {"path": "d"}, "model": {"name": "m"}, **sections})
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text))
    assert expected in str(exc.value)


def test_model_needs_name_or_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.yaml: model: model\.name is required"):
        load(write(tmp_path, "dataset: {path: d}\nmodel: {revision: main}\n"))


def test_missing_required_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.yaml: dataset: Field required"):
        load(write(tmp_path, "model: {name: m}\n"))


def test_nulls_accepted(tmp_path: Path) -> None:
    yaml_text = (
        "dataset: {path: d}\n"
        "model: {name: m, revision: null, device_map: null, attn_implementation: null}\n"
        "capture: {head_sampling: null}\n"
        "output: {hf_repo_id: null}\n"
    )
    cfg = load(write(tmp_path, yaml_text))
    assert cfg.model.revision is None and cfg.model.device_map is None
    assert cfg.model.attn_implementation == "sdpa"  # null means the default kernel
    assert cfg.capture.head_sampling is None and cfg.output.hf_repo_id is None


def test_dtype_aliases_and_resolve_dtype(tmp_path: Path) -> None:
    import torch

    cfg = load(write(tmp_path, "dataset: {path: d}\nmodel: {name: m, dtype: BF16}\ninference: {autocast_dtype: Half}\n"))
    assert (cfg.model.dtype, cfg.inference.autocast_dtype) == ("bfloat16", "float16")
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype("AUTO") == "auto"
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")


def test_env_override(tmp_path: Path) -> None:
    env = {
        "QKCORE_OUTPUT__DATA_ROOT": "/tmp/x",
        "QKCORE_CAPTURE__SAMPLER__TYPE": "all",
        "QKCORE_CAPTURE__LAYERS": "[0, 2]",
        "QKCORE_MODEL__REVISION": "null",
        "QKCORE_LOG_LEVEL": "debug",  # not a config key: ignored
        "OTHER__THING": "x",
    }
    cfg = load(write(tmp_path, SNIFF_QK_YAML), env=env)
    assert cfg.output.data_root == Path("/tmp/x")
    assert cfg.capture.sampler.type == "all"
    assert cfg.capture.sampler.base_rate == 10.0  # sibling from the file survives
    assert cfg.capture.layers == [0, 2]
    assert cfg.model.revision is None


def test_env_unknown_key_names_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$QKCORE_CAPTURE__SAMPLR: unknown key 'capture\.samplr'"):
        load(write(tmp_path, MINIMAL_YAML), env={"QKCORE_CAPTURE__SAMPLR": "x"})


def test_env_bad_value_names_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$QKCORE_INFERENCE__BATCH_SIZE: inference\.batch_size"):
        load(write(tmp_path, MINIMAL_YAML), env={"QKCORE_INFERENCE__BATCH_SIZE": "0"})


def test_env_none_reads_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QKCORE_DATASET__SPLIT", "validation")
    assert load_config(write(tmp_path, MINIMAL_YAML)).dataset.split == "validation"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        # not a mapping where a section is expected: one line (was a SettingsError traceback)
        ({"QKCORE_CAPTURE__SAMPLER": "uniform"}, r"\$QKCORE_CAPTURE__SAMPLER: capture\.sampler: Input should be a valid dict"),
        # keys inside a mapping value are blamed on the variable that holds them
        ({"QKCORE_CAPTURE__SAMPLER": '{"typ": "all"}'}, r"\$QKCORE_CAPTURE__SAMPLER: unknown key 'capture\.sampler\.typ'"),
        ({"QKCORE_MODEL__CONFIG": '{"hidden_size": 8}'}, r"\$QKCORE_MODEL__CONFIG: model\.config: an inline model config"),
    ],
)
def test_env_error_is_one_line_naming_the_variable(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, MINIMAL_YAML), env=env)
    assert re.match(expected, str(exc.value)) and "\n" not in str(exc.value)


@pytest.mark.parametrize("child_first", [False, True])
def test_env_key_variable_beats_its_sections_variable_whatever_their_order(tmp_path: Path, child_first: bool) -> None:
    variables = [("QKCORE_CAPTURE__SAMPLER", '{"type": "uniform", "base_rate": 2}'), ("QKCORE_CAPTURE__SAMPLER__TYPE", "all")]
    cfg = load(write(tmp_path, SNIFF_QK_YAML), env=dict(reversed(variables) if child_first else variables))
    assert (cfg.capture.sampler.type, cfg.capture.sampler.base_rate) == ("all", 2.0)


@pytest.mark.parametrize("value", ['{"layers": [0, 2]}', "{layers: [0, 2]}"])
def test_env_mapping_merges_into_the_files_section_in_json_or_yaml(tmp_path: Path, value: str) -> None:
    cfg = load(write(tmp_path, SNIFF_QK_YAML), env={"QKCORE_CAPTURE": value})
    assert cfg.capture.layers == [0, 2]
    assert (cfg.capture.sampler.type, cfg.capture.min_bucket_size) == ("uniform", 2048)  # the file's, kept


def test_set_beats_env_and_file(tmp_path: Path) -> None:
    env = {"QKCORE_CAPTURE__SAMPLER__TYPE": "all", "QKCORE_INFERENCE__BATCH_SIZE": "2"}
    overrides = ("capture.sampler.type=uniform_bucket", "capture.layers=[0,1]", "model.revision=null")
    cfg = load(write(tmp_path, SNIFF_QK_YAML), overrides, env)
    assert cfg.capture.sampler.type == "uniform_bucket"
    assert cfg.inference.batch_size == 2  # env still beats the file
    assert cfg.capture.layers == [0, 1]
    assert cfg.model.revision is None


def test_set_into_free_dict_and_null_section(tmp_path: Path) -> None:
    overrides = ("model.config_overrides.rope_scaling.factor=8.0", "capture.head_sampling.count=5")
    cfg = load(write(tmp_path, SNIFF_QK_YAML.replace("{count: 300, seed: 0}", "null")), overrides)
    assert cfg.model.config_overrides is not None
    assert cfg.model.config_overrides["rope_scaling"]["factor"] == 8.0
    assert cfg.model.config_overrides["rope_scaling"]["rope_type"] == "yarn"
    assert cfg.capture.head_sampling is not None and cfg.capture.head_sampling.count == 5


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("capture.layers", r"--set capture\.layers: expected key\.path=value"),
        ("=3", r"--set =3: expected key\.path=value"),
        ("capture.samplr=x", r"--set capture\.samplr=x: unknown key 'capture\.samplr'"),
        ("capture.layers=[0,", r"--set capture\.layers=\[0,: value is not valid YAML"),
        ("capture.min_bucket_size=0", r"--set capture\.min_bucket_size=0: capture\.min_bucket_size: .*\(got 0\)"),
    ],
)
def test_bad_set(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load(write(tmp_path, MINIMAL_YAML), (override,))


def test_readme_path_other_than_readme_md_is_ignored_with_a_warning(tmp_path: Path) -> None:
    """sniff-qk always writes DATA_ROOT/README.md; a card elsewhere would hide the configs from load_dataset."""
    for value in ("cards/README.md", str(tmp_path / "elsewhere" / "CARD.md")):
        with pytest.warns(QkcoreConfigWarning, match="readme_path.*ignored.*DATA_ROOT/README.md"):
            cfg = load_config(write(tmp_path, MINIMAL_YAML + f"output: {{data_root: out, readme_path: '{value}'}}\n"), env={})
        assert cfg.output.data_root == tmp_path / "out"


def test_paths_relative_to_cwd_not_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "work" / "local_ds").mkdir(parents=True)
    path = write(tmp_path, "dataset: {path: local_ds}\nmodel: {name: m}\noutput: {data_root: out}\n", "conf/run.yaml")
    monkeypatch.chdir(tmp_path / "work")
    cfg = load(path)
    assert cfg.dataset.path == str(tmp_path / "work" / "local_ds")  # existing local path: absolute
    assert cfg.output.data_root == tmp_path / "work" / "out"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read config file"):
        load(tmp_path / "nope.yaml")


def test_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.yaml: invalid YAML"):
        load(write(tmp_path, "dataset: {path: [unclosed\n"))


def test_top_level_not_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.yaml: top level must be a mapping"):
        load(write(tmp_path, "- a\n- b\n"))


def test_model_config_inline_dict(tmp_path: Path) -> None:
    yaml_text = (
        "dataset: {path: d}\n"
        "model:\n"
        "  config: {model_type: llama, hidden_size: 64, num_hidden_layers: 2}\n"
        "  init_seed: 7\n"
        "tokenizer: {name: some/tokenizer}\n"
    )
    cfg = load(write(tmp_path, yaml_text))
    assert cfg.model.name is None
    assert cfg.model.config == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2}
    assert cfg.model.init_seed == 7 and cfg.tokenizer.name == "some/tokenizer"


def test_model_config_path_and_errors(tmp_path: Path) -> None:
    (tmp_path / "tiny.json").write_text('{"model_type": "llama"}')
    cfg = load(write(tmp_path, "dataset: {path: d}\nmodel: {config: tiny.json}\n"))
    assert cfg.model.config == str(tmp_path / "tiny.json")
    with pytest.raises(ConfigError, match=r"model\.config: no such file or directory"):
        load(write(tmp_path, "dataset: {path: d}\nmodel: {config: missing.json}\n"))
    with pytest.raises(ConfigError, match=r"model\.config: an inline model config needs a 'model_type'"):
        load(write(tmp_path, "dataset: {path: d}\nmodel: {config: {hidden_size: 8}}\n"))


def test_no_raw_validation_error_escapes(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, "dataset: 5\nmodel: {name: m, device_map: -1}\n"))
    assert not isinstance(exc.value, ValidationError)
    assert "run.yaml: dataset:" in str(exc.value) and "model.device_map" in str(exc.value)


# -- configs the original sniff-qk accepts ----------------------------------------------------


def test_unknown_inference_keys_load_with_a_warning_naming_them(tmp_path: Path) -> None:
    with pytest.warns(QkcoreConfigWarning, match="'inference.prefetch' is not a qkcore key; ignored"):
        cfg = load_config(write(tmp_path, MINIMAL_YAML + "inference: {batch_size: 2, prefetch: 4}\n"), env={})
    assert cfg.inference.batch_size == 2


def test_max_samples_zero_loads(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "dataset: {path: d, max_samples: 0}\nmodel: {name: m}\n"))
    assert cfg.dataset.max_samples == 0  # a run refuses it (it would capture nothing); plan shows it


def test_empty_layer_and_head_lists_mean_no_filter(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL_YAML + "capture: {layers: [], heads: []}\n"))
    assert cfg.capture.layers is None and cfg.capture.heads is None


def test_left_padding_and_other_padding_are_ignored_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(QkcoreConfigWarning, match="padding_side: 'left' is ignored: qkcore right-pads"):
        cfg = load_config(write(tmp_path, MINIMAL_YAML + "tokenizer: {padding_side: left}\n"), env={})
    assert cfg.tokenizer.padding_side == "left"
    with pytest.warns(QkcoreConfigWarning, match="tokenizer.padding: 'max_length' is ignored"):
        load_config(write(tmp_path, MINIMAL_YAML + "tokenizer: {padding: max_length}\n"), env={})


@pytest.mark.parametrize(("written", "meant"), [("Uniform", "uniform"), ("ALL", "all"), ("log", "log_uniform"),
                                                 ("Log_Uniform", "log_uniform")])
def test_sampler_type_is_case_insensitive_and_log_is_log_uniform(tmp_path: Path, written: str, meant: str) -> None:
    cfg = load(write(tmp_path, MINIMAL_YAML + f"capture: {{sampler: {{type: {written}}}}}\n"))
    assert cfg.capture.sampler.type == meant


@pytest.mark.parametrize("device_map, words", [("gpu0", "'gpu0' is not a device"), ("cpu:1", "is not a device"),
                                               ("{a: cpu, b: disk}", "only a single device"), ("-1", ">= 0")])
def test_the_form_of_device_map_is_checked_when_the_config_loads(tmp_path, device_map: str, words: str) -> None:
    with pytest.raises(ConfigError, match=rf"run\.yaml: model\.device_map: .*{re.escape(words)}"):
        load(write(tmp_path, f"dataset: {{path: x}}\nmodel: {{name: m, device_map: {device_map}}}\n"))


@pytest.mark.parametrize("value", [".inf", ".nan", "0", "true"])
def test_base_rate_follows_the_samplers_rule_when_the_config_loads(tmp_path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"run\.yaml: capture\.sampler\.base_rate: must be a"):
        load(write(tmp_path, f"dataset: {{path: x}}\nmodel: {{name: m}}\ncapture: {{sampler: {{base_rate: {value}}}}}\n"))
