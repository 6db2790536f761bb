"""``qkcore inspect`` on a real tiny capture: counts, histogram, coverage, plot, with and without the card."""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import numpy as np
import pyarrow.parquet as pq
import pytest

from qkcore.cli import QkcoreCli, main
from qkcore.config import load_config
from qkcore.errors import QkcoreError
from qkcore.inspect_data import (
    DEFAULT_PLOT,
    format_inspection,
    inspect_data,
    plot_rows_per_bucket,
)
from qkcore.plugins import make_plugin_manager
from qkcore.sniff import run_sniff
from tests.conftest import TEXTS, make_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> Path:
    """One tiny sniff (5 query heads of a 3-layer Llama, uniform sampler), shared by the tests."""
    tmp = tmp_path_factory.mktemp("inspect")
    capture = {"head_sampling": {"count": 5, "seed": 0}, "sampler": {"type": "uniform", "base_rate": 8}, "min_bucket_size": 16}
    result = run_sniff(load_config(make_config(tmp, capture=capture)), make_plugin_manager())
    assert sum(result.rows.values()) > 0
    return result.data_root


def _disk_rows(root: Path) -> dict[str, int]:
    return {p.parent.name: pq.read_metadata(p).num_rows for p in root.glob("l*h*/data.parquet")}


def test_counts_histogram_and_coverage_match_the_files(captured) -> None:
    ins = inspect_data(captured)
    disk = _disk_rows(captured)
    assert {c.name: c.rows for c in ins.configs} == disk
    assert ins.total_rows == sum(disk.values())
    for c in ins.configs:
        assert sum(c.bucket_counts.values()) == c.rows
        table = pq.read_table(captured / c.name / "data.parquet", columns=["bucket", "example_id"])
        values, counts = np.unique(table.column("bucket").to_numpy(), return_counts=True)
        assert c.bucket_counts == dict(zip(values.tolist(), counts.tolist()))
        assert c.examples == len(np.unique(table.column("example_id").to_numpy()))
    assert sum(ins.bucket_counts().values()) == ins.total_rows
    assert sum(ins.bucket_counts("q").values()) + sum(ins.bucket_counts("k").values()) == ins.total_rows
    assert sum(sum(ins.bucket_counts(layer=layer).values()) for layer in ins.layers) == ins.total_rows
    assert len(ins.query_heads) == 5
    assert ins.layers == sorted({c.layer for c in ins.configs})
    assert ins.examples == len(TEXTS)
    assert [m["name"] for m in ins.models] == ["test/tiny"] and ins.card_notes == []


def test_report_lists_every_config(captured) -> None:
    text = format_inspection(inspect_data(captured))
    for name, rows in _disk_rows(captured).items():
        line = next(line for line in text.splitlines() if line.strip().startswith(name))
        assert f"{rows:,}" in line
    assert "coverage:" in text and "5 query heads" in text and f"{len(TEXTS)} examples" in text
    assert "test/tiny" in text


def test_plot_is_a_real_png(captured, tmp_path) -> None:
    from matplotlib.image import imread

    path = plot_rows_per_bucket(inspect_data(captured), tmp_path / "sub" / "rows.png")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000
    image = imread(path)
    assert image.shape[0] >= 400 and image.shape[1] >= 800
    assert float(image[..., :3].std()) > 0.01  # drawn lines and text, not a blank canvas


def test_works_without_a_card_and_notices_a_stale_one(captured, tmp_path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(captured, root)
    (root / "README.md").unlink()
    ins = inspect_data(root)
    assert ins.models == [] and any("no dataset card" in n for n in ins.card_notes)
    assert {c.name: c.rows for c in ins.configs} == _disk_rows(captured)
    assert "note: no dataset card" in format_inspection(ins)

    shutil.copy(captured / "README.md", root / "README.md")
    gone = inspect_data(root).configs[0].name
    shutil.rmtree(root / gone)
    assert any("not on disk" in n for n in inspect_data(root).card_notes)


def test_inspect_command_prints_and_plots(captured, tmp_path, capsys) -> None:
    cli = QkcoreCli()
    command = cli.get_command(click.Context(cli), "inspect")
    assert command.name == "inspect" and command.help

    out = tmp_path / "plot.png"
    assert main(["inspect", str(captured), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG_MAGIC and str(out) in printed

    root = tmp_path / "default"
    shutil.copytree(captured, root)
    assert main(["inspect", str(root)]) == 0
    assert (root / DEFAULT_PLOT).read_bytes()[:8] == PNG_MAGIC


def test_folder_without_configs_is_an_error(tmp_path) -> None:
    with pytest.raises(QkcoreError, match="no lXXhYY"):
        inspect_data(tmp_path)
    with pytest.raises(QkcoreError, match="no such data folder"):
        inspect_data(tmp_path / "missing")
