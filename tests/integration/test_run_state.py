"""The typed run state reads what the release before it wrote, and writes the same layout back.

The fixtures under ``tests/fixtures/state_v1`` were written by qkcore before the run's
facts were typed (see their ABOUT.md); they must never be regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkcore.card import ModelEntry, card_models, read_card
from qkcore.errors import QkcoreError
from qkcore.manifest import Manifest
from qkcore.output.record import Record
from qkcore.run_state import HubTarget, PublishedFile, RunIdentity, RunState, RunSummary

V1 = Path(__file__).parents[1] / "fixtures" / "state_v1"


def _json(name: str) -> dict:
    return json.loads((V1 / name).read_text(encoding="utf-8"))


def test_a_complete_pushed_record_of_the_last_release_reads_typed_and_writes_back_unchanged() -> None:
    text = (V1 / "run_complete_pushed.json").read_text(encoding="utf-8")
    record = Record.from_json(text, "run.json")
    assert record.state == "complete" and record.pushed
    assert isinstance(record.hub, HubTarget) and record.hub.is_pushed_to("lab/sniffed-qk", "tiny")
    assert not record.hub.is_pushed_to("lab/sniffed-qk", "other")
    assert record.summary.model == "test/tiny" and record.summary.documents == 5
    assert all(isinstance(f, PublishedFile) and f.size and f.mtime_ns for f in record.files.values())
    assert record.run_key == json.loads(text)["run_key"]
    assert RunIdentity.of(record.identity.document).key == record.run_key  # the key is the identity's hash
    assert json.loads(record.to_json()) == json.loads(text)


def test_a_half_published_record_reads_with_its_unknown_mtimes() -> None:
    record = Record.from_json((V1 / "run_publishing.json").read_text(encoding="utf-8"), "run.json")
    assert record.state == "publishing" and record.hub is None and not record.pushed
    assert {f.mtime_ns for f in record.files.values()} == {0}


@pytest.mark.parametrize("name, phase", [("journal_capturing.json", "capturing"), ("journal_finalized.json", "finalized")])
def test_journal_states_of_the_last_release_read_typed_and_round_trip(name: str, phase: str) -> None:
    old = _json(name)["state"]
    state = RunState.from_json(old)
    assert state.phase == phase and state.run_key == old["run_key"] and state.documents == old["documents"]
    assert state.example_ids == tuple(old["example_ids"])
    assert RunState.from_json(state.to_json()) == state
    # The same layout, each file entry now also saying its mtime is unknown.
    written = state.to_json()
    assert written["files"] == {n: {**f, "mtime_ns": 0} for n, f in old["files"].items()}
    assert {k: v for k, v in written.items() if k not in ("files", "summary")} == {
        k: v for k, v in old.items() if k not in ("files", "summary")}
    if phase == "finalized":
        assert state.summary == RunSummary.from_json(old["summary"]) and state.summary.model == "test/tiny"
        assert written["summary"] == old["summary"]
    else:
        assert state.summary is None and written["summary"] == {} == old["summary"]


def test_the_manifest_and_the_card_of_the_last_release_read_typed() -> None:
    manifest = Manifest.from_json((V1 / "qkcore.json").read_text(encoding="utf-8"))
    record = Record.from_json((V1 / "run_complete_pushed.json").read_text(encoding="utf-8"), "run.json")
    assert manifest.identity == record.identity
    files = manifest.published_files()
    assert all(files[name].matches(entry) for name, entry in record.files.items() if name != "qkcore.json")
    assert json.loads(manifest.to_json()) == _json("qkcore.json")
    entry = ModelEntry.from_json(card_models(read_card((V1 / "README.md").read_text(encoding="utf-8")))[0])
    assert entry.summary() == record.summary
    assert all(isinstance(layer, int) for layer in entry.selected_heads)
    assert all(isinstance(q, int) for heads in entry.key_head_of_query.values() for q in heads)


@pytest.mark.parametrize("damage", [
    lambda d: d.update(state="finished"),
    lambda d: d["files"]["README.md"].pop("sha256"),
    lambda d: d.update(hub={"repo": "x"}),
    lambda d: d["summary"].update(documents="five"),
])
def test_a_damaged_record_is_one_error_naming_the_file(damage) -> None:
    data = _json("run_complete_pushed.json")
    damage(data)
    with pytest.raises(QkcoreError, match=r"^/x/run\.json is unreadable \(.*with --replace"):
        Record.from_json(json.dumps(data), "/x/run.json")


@pytest.mark.parametrize("damage, words", [
    (lambda s: s.update(phase="done"), "unknown phase"),
    (lambda s: s.update(example_ids=["a"]), "example_ids"),
    (lambda s: s.pop("run_key"), "run_key"),
])
def test_a_damaged_journal_state_is_refused_with_what_is_wrong(damage, words: str) -> None:
    state = _json("journal_capturing.json")["state"]
    damage(state)
    with pytest.raises(ValueError, match=words):
        RunState.from_json(state)


def test_the_config_of_the_fixtures_captures_today_the_same_run_key_and_the_same_bytes(tiny_config, tmp_path) -> None:
    """The fixtures' run, captured again: its identity, key and every data file's sha256 are unchanged."""
    from qkcore.config import load_config
    from qkcore.output import LocalDataRoot
    from qkcore.sniff import run_sniff

    cfg = load_config(tiny_config(
        capture={"sampler": {"type": "uniform", "base_rate": 6}, "head_sampling": {"count": 4, "seed": 3}},
        output={"data_root": str(tmp_path / "again"), "commit_every_s": 0},
    ))
    run_sniff(cfg)
    old = Record.from_json((V1 / "run_complete_pushed.json").read_text(encoding="utf-8"), "run.json")
    new = LocalDataRoot(tmp_path / "again").read_record()
    assert new is not None and new.identity == _with_installed_transformers(old.identity)
    data = [name for name in old.files if name.endswith("/data.parquet")]
    assert data and sorted(n for n in new.files if n.endswith("/data.parquet")) == sorted(data)
    # The files' bytes changed on purpose since the fixtures were written (each Parquet file now
    # carries a page index for the Hub's viewer), so the rows are compared through the manifest.
    old_manifest = Manifest.from_json((V1 / "qkcore.json").read_text(encoding="utf-8"))
    new_manifest = Manifest.from_json((tmp_path / "again" / "qkcore.json").read_text(encoding="utf-8"))
    assert {n: (c.rows, c.bucket_counts) for n, c in new_manifest.configs.items()} == {
        n: (c.rows, c.bucket_counts) for n, c in old_manifest.configs.items()
    }


def _with_installed_transformers(identity: RunIdentity) -> RunIdentity:
    """The fixtures' identity as this machine computes it: random weights are pinned by the transformers
    version that initialises them, so a newer release is another run (the key changes with it, on purpose)."""
    import copy

    import transformers

    document = copy.deepcopy(dict(identity.document))
    weights = document.get("model", {}).get("weights", {})
    if "transformers" in weights:
        weights["transformers"] = transformers.__version__
    return RunIdentity.of(document)
