"""Every bad input: one ``qkcore: error:`` line (exit 2) naming the key, file or row, and nothing changed.

Each case of the table sets up one bad input the way a user would meet it, runs the
command in this process (``qkcore.cli.main``), and checks what the user sees and what is
left on disk:

* exit status 2 and exactly one ``qkcore: error:`` line holding the expected words;
* no traceback;
* no byte of an earlier run changed (cases run against a copy of a finished data root),
  or, for a fresh data root, nothing written at all.

The config tests (``tests/unit/test_config.py``) cover the bad values of each key; this table
covers what reaches a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from qkcore.cli import main
from qkcore.output import LocalDataRoot
from qkcore.writer import DatasetWriter
from tests.conftest import REPO, TEXTS, TINY_LLAMA, write_corpus


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z \[\w+\s*\] ")
_BAR = re.compile(r"(examples|it)/s\]")


@dataclass
class Env:
    """A case's sandbox: a config to edit, a corpus, and (optionally) a finished data root."""

    tmp: Path
    config: dict
    held: contextlib.ExitStack | None = None  # a lock the case holds while the command runs

    @property
    def root(self) -> Path:
        return Path(self.config["output"]["data_root"])

    def write(self, name: str = "run.yaml") -> Path:
        path = self.tmp / name
        path.write_text(yaml.safe_dump(self.config), encoding="utf-8")
        return path

    def sniff(self, *extra: str) -> list[str]:
        return ["sniff", "--config", str(self.write()), *extra]

    def corpus(self, lines: str, name: str = "bad.jsonl") -> None:
        path = self.tmp / name
        path.write_bytes(lines.encode("utf-8"))
        self.config["dataset"]["path"] = str(path)


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Env], list[str]]  # edits the sandbox, returns the command line
    expect: tuple[str, ...]  # words the error line must hold
    earlier_run: bool = False  # run against a copy of a finished data root


def _with(section: str, **values) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        env.config.setdefault(section, {}).update(values)
        return env.sniff()

    return setup


def _model(**values) -> Callable[[Env], list[str]]:
    return _with("model", **values)


def _capture(**values) -> Callable[[Env], list[str]]:
    return _with("capture", **values)


def _corpus(lines: str, name: str = "bad.jsonl", **dataset) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        env.corpus(lines, name)
        env.config["dataset"].update(dataset)
        return env.sniff()

    return setup


def _rows(*rows: dict, **dataset) -> Callable[[Env], list[str]]:
    return _corpus("".join(json.dumps(r) + "\n" for r in rows), **dataset)


def _raw_config(text: bytes) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        path = env.tmp / "raw.yaml"
        path.write_bytes(text)
        return ["sniff", "--config", str(path)]

    return setup


def _args(*extra: str) -> Callable[[Env], list[str]]:
    return lambda env: env.sniff(*extra)


def _then(first: Callable[[Env], None], second: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        first(env)
        return second(env)

    return setup


def _architecture_file(text: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        path = env.tmp / "arch.json"
        path.write_text(text, encoding="utf-8")
        env.config["model"]["config"] = str(path)
        return env.sniff()

    return setup


def _data_root_file(env: Env) -> list[str]:
    env.config["output"]["data_root"] = str(env.tmp / "a-file")
    (env.tmp / "a-file").write_text("not a folder")
    return env.sniff()


def _data_root_under_a_file(env: Env) -> list[str]:
    (env.tmp / "blocker").write_text("a file where a folder would go")
    env.config["output"]["data_root"] = str(env.tmp / "blocker" / "out")
    return env.sniff()


def _staged_other_run(env: Env) -> list[str]:
    from qkcore.run_state import RunIdentity, RunState

    writer = DatasetWriter(LocalDataRoot(env.root).staging_dir, run_key="feedfacecafebeef")
    writer.commit(RunState(RunIdentity("feedfacecafebeef", {"rules": 1}), documents=3).to_json())
    writer.abort()
    return env.sniff()


def _ranks_left(env: Env) -> list[str]:
    for rank in (0, 1, 2):
        writer = DatasetWriter(LocalDataRoot(env.root).rank_staging(rank), run_key="feedfacecafebeef")
        writer.commit({"documents": 1})
        writer.abort()
    return env.sniff()


def _half_published_other_run(env: Env) -> list[str]:
    root = LocalDataRoot(env.root)
    record = root.read_record()
    identity = dataclasses.replace(record.identity, key="0badc0de0badc0de")
    root.write_record(dataclasses.replace(record, state="publishing", identity=identity))
    return env.sniff()


def _corrupt_record(env: Env) -> list[str]:
    (LocalDataRoot(env.root).state_dir / "run.json").write_text("{not json", encoding="utf-8")
    return env.sniff()


def _corrupt_journal(env: Env) -> list[str]:
    staging = LocalDataRoot(env.root).staging_dir
    staging.mkdir(parents=True)
    (staging / "journal.json").write_text("[1, 2", encoding="utf-8")
    return env.sniff()


def _locked(env: Env) -> list[str]:
    root = LocalDataRoot(env.root)
    root.check_usable()
    stack = contextlib.ExitStack()
    stack.enter_context(root.locked("qkcore sniff --config other.yaml"))
    env.held = stack  # released by the test after the run
    return env.sniff()


def _foreign_files(env: Env) -> list[str]:
    (env.root / "l00h00q").mkdir(parents=True)
    (env.root / "l00h00q" / "data.parquet").write_bytes(b"PAR1 not ours")
    (env.root / "README.md").write_text("---\nconfigs: [unclosed\n", encoding="utf-8")
    return env.sniff()


def _saved_dataset_without_split(env: Env) -> list[str]:
    from datasets import Dataset, DatasetDict

    DatasetDict({"test": Dataset.from_dict({"text": ["a"], "id": [1]})}).save_to_disk(str(env.tmp / "saved"))
    env.config["dataset"].update(path=str(env.tmp / "saved"), split="train")
    return env.sniff()


def _interrupt_free_push(*extra: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        env.config["output"].update(hf_repo_id="lab/qk", hf_branch="tiny")
        return ["push", "--config", str(env.write()), *extra]

    return setup


def _push_without_repo(env: Env) -> list[str]:
    return ["push", "--config", str(env.write())]


def _push_half_published(env: Env) -> list[str]:
    root = LocalDataRoot(env.root)
    root.write_record(dataclasses.replace(root.read_record(), state="publishing"))
    return _interrupt_free_push()(env)


def _push_changed_file(env: Env) -> list[str]:
    victim = next(env.root.glob("l*/data.parquet"))
    victim.write_bytes(victim.read_bytes()[:-2] + b"\0\0")
    return _interrupt_free_push()(env)


def _push_nothing(env: Env) -> list[str]:
    return _interrupt_free_push()(env)


def _set(*items: str) -> Callable[[Env], list[str]]:
    return lambda env: env.sniff(*(arg for item in items for arg in ("--set", item)))


CASES = [
    # -- the config file and overrides
    Case("config-not-utf8", _raw_config(b"model: {name: \xff\xfe}\n"), ("raw.yaml", "not UTF-8")),
    Case("config-invalid-yaml", _raw_config(b"model: [unclosed\n"), ("raw.yaml", "invalid YAML at line 2, column 1")),
    Case("config-invalid-yaml-indent", _raw_config(b"model:\n  name: a\n   config: b\n"),
         ("raw.yaml: invalid YAML at line 3", "mapping values are not allowed")),
    Case("config-top-level-list", _raw_config(b"- a\n- b\n"), ("raw.yaml", "top level must be a mapping")),
    Case("config-missing-file", lambda env: ["sniff", "--config", str(env.tmp / "nope.yaml")], ("nope.yaml", "cannot read")),
    Case("config-unknown-key", _capture(samplr={"type": "all"}), ("run.yaml", "capture.samplr")),
    Case("set-unknown-key-blames-set", _set("capture.samplr.type=all"), ("--set capture.samplr.type=all", "capture.samplr")),
    Case("set-without-equals", _set("capture.sampler.type"), ("--set capture.sampler.type", "expected key.path=value")),
    Case("set-bad-yaml-value", _set("capture.layers=[0, 1"), ("--set capture.layers=[0, 1", "not valid YAML: column 6")),
    Case("set-bad-value", _set("inference.batch_size=0"), ("--set inference.batch_size=0", "inference.batch_size")),
    Case("unknown-sampler", _capture(sampler={"type": "zipf"}), ("capture.sampler.type", "zipf", "uniform")),
    Case("sampler-base-rate-negative", _capture(sampler={"type": "uniform", "base_rate": -1}), ("capture.sampler.base_rate",)),
    Case("min-bucket-size-zero", _capture(min_bucket_size=0), ("capture.min_bucket_size",)),
    Case("head-sampling-count-zero", _capture(head_sampling={"count": 0}), ("capture.head_sampling.count",)),
    Case("capture-nothing", _capture(capture_queries=False, capture_keys=False), ("nothing would be captured",)),
    Case("layer-filter-out-of-range", _capture(layers=[99]), ("capture.layers/heads", "layer 99 does not exist")),
    Case("head-filter-out-of-range", _capture(heads=[99]), ("query head 99 does not exist",)),
    Case("bad-dtype", _model(dtype="float8"), ("model.dtype", "unknown dtype")),
    Case("batch-size-zero", _with("inference", batch_size=0), ("inference.batch_size",)),
    Case("max-length-zero", _with("tokenizer", max_length=0), ("tokenizer.max_length",)),
    Case("max-samples-zero", _with("dataset", max_samples=0), ("dataset.max_samples", "0 documents")),
    Case("model-section-missing", lambda env: (env.config.pop("model"), env.sniff())[1], ("model", "Field required")),
    # -- documents
    Case("dataset-missing", _with("dataset", path="no/such-dataset-anywhere"), ("dataset.path", "no/such-dataset-anywhere")),
    Case("dataset-empty-file", _corpus(""), ("dataset.path", "bad.jsonl is empty")),
    Case("dataset-bad-json-line", _corpus('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"\n{"id": 3}\n'),
         ("bad.jsonl line 2 is not valid JSON",)),
    Case("dataset-json-line-not-object", _corpus('{"id": 1, "text": "a"}\n[1, 2]\n'), ("bad.jsonl line 2 is a JSON list",)),
    Case("dataset-unsupported-type", _corpus("<xml/>", name="corpus.xml"), ("dataset.path", "unsupported file type '.xml'")),
    Case("dataset-text-column-missing", _with("dataset", text_column="body"), ("dataset.text_column", "'body' not found", "text")),
    Case("dataset-id-column-missing", _with("dataset", id_column="doc_id"), ("dataset.id_column", "'doc_id' not found")),
    Case("dataset-split-missing", _saved_dataset_without_split, ("dataset.split", "'train'", "test")),
    Case("text-null", _rows({"id": 1, "text": "ok"}, {"id": 2, "text": None}), ("dataset.text_column", "row 1 (id 2)", "null")),
    Case("text-integer", _rows({"id": 1, "text": "ok"}, {"id": 2, "text": 12345}), ("row 1 (id 2)", "a int (12345)")),
    Case("text-list", _rows({"id": 1, "text": ["a"]}, {"id": 2, "text": ["b"]}), ("row 0 (id 1)", "a list")),
    Case("text-all-empty", _rows({"id": 1, "text": ""}, {"id": 2, "text": ""}), ("all 2 texts", "are empty")),
    Case("text-null-streaming", _rows({"id": 1, "text": "ok"}, {"id": 2, "text": None}, streaming=True),
         ("row 1 (id 2)", "null")),
    Case("ids-duplicate", _rows({"id": "a", "text": "x"}, {"id": "b", "text": "y"}, {"id": "a", "text": "z"}),
         ("dataset.id_column", "rows 0 and 2", "'a'")),
    Case("ids-duplicate-streaming", _rows({"id": 7, "text": "x"}, {"id": 7.0, "text": "y"}, streaming=True),
         ("rows 0 and 1", "example id 7")),
    # -- model and architecture
    Case("model-config-missing-file", _model(config="/no/such/arch.json"), ("model.config", "no such file")),
    Case("model-config-bad-json", _architecture_file("{not json"), ("model.config", "not valid JSON")),
    Case("model-config-no-model-type", _architecture_file('{"hidden_size": 8}'), ("model.config", "model_type")),
    Case("model-uninstrumentable", _model(config={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
                                                  "vocab_size": 259, "n_positions": 512}),
         ("gpt2", "cannot be instrumented", "llama")),
    Case("tokenizer-missing-name", _with("tokenizer", name=None), ("tokenizer.name",)),
    Case("model-unknown-type", _model(config={"model_type": "lama", "hidden_size": 8}),
         ("model.config", "no model_type 'lama'", "closest: llama")),
    Case("model-unknown-rope-type", _model(config_overrides={"rope_scaling": {"rope_type": "yarnn", "factor": 2.0}}),
         ("model.config_overrides", "unknown rope_type 'yarnn'", "did you mean 'yarn'")),
    # sniff-qk writes nothing and exits 0 here (README, compatibility table): qkcore refuses.
    Case("model-mistral-sliding-window-full-attention-only",
         _then(lambda env: env.config["capture"].update(full_attention_only=True),
               _model(config={**TINY_LLAMA, "model_type": "mistral", "sliding_window": 64})),
         ("capture", "no layer is eligible", "full_attention_only=True")),
    Case("model-device-not-a-device", _model(device_map="gpu0"), ("model.device_map", "'gpu0' is not a device")),
    Case("model-missing-directory", _model(name="./no/such/model", config=None),
         ("model.name", "there is no directory", "not a Hub id either")),
    Case("tokenizer-missing-directory", _with("tokenizer", name="./no/such/tokenizer"),
         ("tokenizer.name", "there is no directory", "not a Hub id either")),
    Case("model-relative-folder-missing", _then(lambda env: env.config["tokenizer"].update(name=None),
                                                _model(name="models/SmolLM2-135M", config=None)),
         ("model.name: there is no folder 'models/SmolLM2-135M' in", "no Hub repo 'models/SmolLM2-135M'")),
    Case("model-gguf-missing-file", _model(name=None, config=None, gguf_file="/no/such/model.gguf"),
         ("model.gguf_file", "/no/such/model.gguf")),
    # -- the data root
    Case("data-root-is-a-file", _data_root_file, ("output.data_root", "a-file is a file")),
    Case("data-root-unwritable", _data_root_under_a_file, ("output.data_root", "cannot write to", "blocker")),
    Case("data-root-another-run", _capture(head_sampling={"count": 4, "seed": 9}),
         ("holds run", "different run", "capture.head_sampling", "--replace"), earlier_run=True),
    Case("data-root-another-model", _model(init_seed=5), ("holds run", "model.weights.init_seed (0 -> 5)"), earlier_run=True),
    Case("data-root-edited-corpus", lambda env: (write_corpus(Path(env.config["dataset"]["path"]),
                                                              [*TEXTS[:-1], ("new", "A new text.")]), env.sniff())[1],
         ("dataset.documents.sha256",), earlier_run=True),
    Case("data-root-foreign-files", _foreign_files, ("no qkcore run recorded", "README.md", "l00h00q/data.parquet")),
    Case("data-root-staged-other-run", _staged_other_run,
         ("holds the unfinished run feedfacecafebeef", "3 documents captured", "--restart"), earlier_run=True),
    Case("data-root-torchrun-leftovers", _ranks_left, ("3-process torchrun run", "--restart"), earlier_run=True),
    Case("data-root-half-published-other-run", _half_published_other_run,
         ("half-way through publishing run 0badc0de0badc0de", "--replace"), earlier_run=True),
    Case("data-root-corrupt-record", _corrupt_record, ("run.json is unreadable",), earlier_run=True),
    Case("data-root-corrupt-journal", _corrupt_journal, ("journal.json is unreadable",), earlier_run=True),
    Case("data-root-in-use", _locked, ("is in use by process", "qkcore sniff --config other.yaml"), earlier_run=True),
    # -- push
    Case("push-without-repo", _push_without_repo, ("output.hf_repo_id is not set",)),
    Case("push-nothing-captured", _push_nothing, ("holds no qkcore run",)),
    Case("push-half-published", _push_half_published, ("half-way through publishing", "qkcore sniff --config"),
         earlier_run=True),
    Case("push-changed-files", _push_changed_file, ("do not match the record", "nothing was pushed"), earlier_run=True),
    # -- other commands
    Case("inspect-missing-folder", lambda env: ["inspect", str(env.tmp / "missing")], ("no such data folder",)),
    Case("plasticity-folder-without-data", lambda env: ((env.tmp / "empty-root").mkdir(), ["plasticity", str(env.tmp / "empty-root")])[1],
         ("empty-root: no captured query heads", "qkcore sniff")),
    Case("plan-offline-protocol-config", lambda env: ["plan", "--config", str(REPO / "configs/attention-plasticity/qwen3-8b.yaml")],
         ("model.name", "no Hub repo 'Qwen/Qwen3-8B'", "--set model.config=", "Qwen--Qwen3-8B.json")),
    Case("plan-unknown-sampler", lambda env: (env.config["capture"].update(sampler={"type": "zipf"}),
                                              ["plan", "--config", str(env.write())])[1], ("capture.sampler.type",)),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished run (the tiny Llama over the test corpus), copied into cases that need an earlier run."""
    folder = tmp_path_factory.mktemp("finished")
    env = _env(folder)
    assert _run(env.sniff())[0] == 0
    return folder


def _env(tmp: Path) -> Env:
    corpus = write_corpus(tmp / "corpus.jsonl")
    return Env(tmp, {
        "dataset": {"path": str(corpus), "text_column": "text", "id_column": "id"},
        "model": {"name": "test/tiny", "config": dict(TINY_LLAMA), "dtype": "float32", "device_map": "cpu"},
        "tokenizer": {"name": "qkcore:bytes", "max_length": 512},
        "inference": {"batch_size": 2},
        "capture": {"sampler": {"type": "all"}, "min_bucket_size": 16, "head_sampling": {"count": 4, "seed": 0}},
        "output": {"data_root": str(tmp / "out")},
    })


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _bytes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("lock", "lock.json")
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, tmp_path: Path, finished: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = _env(tmp_path)
    if case.earlier_run:
        shutil.copytree(finished / "out", env.root)  # copy2 keeps modification times: the record still matches
        shutil.copy2(finished / "corpus.jsonl", tmp_path / "corpus.jsonl")
    argv = case.setup(env)
    held = env.held
    before = _bytes(env.root) if env.root.exists() else None
    try:
        code, err = _run(argv)
    finally:
        if held is not None:
            held.close()
    errors = [line for line in err.splitlines() if line.startswith("qkcore: error:")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    # Nothing but qkcore's own lines and log lines: no second line of a multi-line message, no library's retry chatter.
    # (datasets' progress bars are here only because this process imported datasets before the CLI turned them off.)
    stray = [line for line in err.splitlines()
             if line.strip() and not line.startswith("qkcore: ") and not _LOG_LINE.match(line) and not _BAR.search(line)]
    assert not stray, err[-3000:]
    for words in case.expect:
        assert words in errors[0], f"{words!r} not in: {errors[0]}"
    if before is None:
        assert not env.root.exists() or not any(env.root.iterdir()), "a refused run must write nothing"
    else:
        assert _bytes(env.root) == before, "a refused run must not change a byte of the data root"


def test_the_table_covers_each_kind_of_input() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 65
    for prefix in ("config", "set", "dataset", "text", "ids", "model", "data-root", "push"):
        assert any(i.startswith(prefix) for i in ids), prefix

