"""The output interface: the run reaches its data root only through the ``DataRoot`` that ``open_output`` builds."""

from __future__ import annotations

import inspect
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

import qkcore.sniff
from qkcore.config import load_config
from qkcore.output import DataRoot, LocalDataRoot, open_output
from qkcore.sniff import run_sniff
from tests.conftest import write_corpus
from tests.hub_server import HubServer, hub_server  # noqa: F401 (fixture)

REPO, BRANCH = "lab/elsewhere", "tiny-llama"


def _protocol_members() -> dict[str, object]:
    return {name: member for name, member in vars(DataRoot).items() if not name.startswith("_")}


def test_local_data_root_implements_the_protocol(tmp_path) -> None:
    root = LocalDataRoot(tmp_path / "out")
    members = _protocol_members()
    assert {"location", "staging_dir", "publish", "read_manifest", "local_copy"} <= set(members)
    for name, member in members.items():
        if isinstance(member, property):  # an attribute or a property of the instance
            value = getattr(root, name)
            expected = member.fget.__annotations__["return"]  # type: ignore[union-attr]
            assert isinstance(value, {"str": str, "Path": Path}[expected]), name
            continue
        mine = inspect.signature(getattr(LocalDataRoot, name)).parameters
        wanted = inspect.signature(member).parameters  # type: ignore[arg-type]
        assert [(p.name, p.kind) for p in mine.values()] == [(p.name, p.kind) for p in wanted.values()], name
    assert not (tmp_path / "out").exists()  # building it creates nothing


def test_open_output_builds_the_configured_local_folder(tiny_config, tmp_path) -> None:
    cfg = load_config(tiny_config(output={"data_root": str(tmp_path / "out")}))
    root = open_output(cfg.output)
    assert isinstance(root, LocalDataRoot) and root.path == tmp_path / "out"
    assert root.location == str(tmp_path / "out") and root.staging_dir == tmp_path / "out" / ".qkcore" / "staging"
    assert not root.has_state() and not (tmp_path / "out").exists()


class _Elsewhere(LocalDataRoot):
    """A backend whose published files are not at ``output.data_root`` and not named by a local path.

    Like an object-storage backend, it names its data by URL and hands the Hub push a
    downloaded copy; its work folders are local. A run that touched ``output.data_root``
    or pushed from a path of its own making would miss the files.
    """

    def __init__(self, path: Path, url: str) -> None:
        super().__init__(path)
        self.url = url
        self.copies: list[Path] = []

    @property
    def location(self) -> str:
        return self.url

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory() as folder:
            for name in self.dataset_files():
                (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.path / name, Path(folder) / name)
            self.copies.append(Path(folder))
            yield Path(folder)


@pytest.mark.slow
def test_the_run_reaches_published_data_only_through_its_data_root(
    tiny_config, tmp_path, hub_server: HubServer, monkeypatch
) -> None:
    corpus = write_corpus(tmp_path / "docs.jsonl", [("a", "Tide gauges and sluices."), ("b", "Looms, warp and weft.")])
    configured = tmp_path / "configured"
    config = tiny_config(dataset={"path": str(corpus)}, output={"data_root": str(configured), "hf_repo_id": REPO,
                                                                "hf_branch": BRANCH})
    backend = _Elsewhere(tmp_path / "bucket", "fake://bucket/run")
    built = []

    def open_elsewhere(output_cfg) -> DataRoot:
        built.append(output_cfg.data_root)
        return backend

    monkeypatch.setattr(qkcore.sniff, "open_output", open_elsewhere)
    result = run_sniff(load_config(config))
    assert built == [configured] and result.action == "captured" and result.rows
    assert not configured.exists()  # the run never went around its data root
    published = {name: (backend.path / name).read_bytes() for name in backend.dataset_files()}
    assert set(published) == {"README.md", "qkcore.json", *(f"{name}/data.parquet" for name in result.rows)}
    branch = hub_server.files(REPO, BRANCH)
    branch.pop(".gitattributes", None)
    assert branch == published and len(backend.copies) == 1  # pushed from the backend's copy

    again = run_sniff(load_config(config))
    assert again.action == "already complete" and again.rows == result.rows
    assert not configured.exists()
