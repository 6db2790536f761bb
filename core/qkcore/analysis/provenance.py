"""Which run an analysis output belongs to: the facts of a run, and outputs that carry them.

``qkcore plasticity`` writes ``plasticity.json`` beside its CSVs: the run key it analysed,
the run's facts as its card states them (:class:`RunFacts`) and the estimator's settings.
That file lets ``qkcore compare`` reuse an output only when it was computed from exactly
this run with exactly these settings, and lets a data root that publishes another run
remove the outputs that now describe data it no longer holds (:func:`remove_stale_outputs`,
called by the local data root when it publishes).

The card is read through :mod:`qkcore.card`'s public readers only (``read_card``,
``card_models``, ``card_run_key``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qkcore.card import card_models, card_run_key, read_card
from qkcore.errors import QkcoreError

__all__ = [
    "INSPECT_PLOT",
    "PLASTICITY_DIR",
    "PROVENANCE_FILE",
    "PlasticityProvenance",
    "RunFacts",
    "parse_checkpoint",
    "png_run_key",
    "read_provenance",
    "remove_stale_outputs",
]

#: Written by ``qkcore plasticity`` beside its CSVs.
PROVENANCE_FILE = "plasticity.json"
#: The default output folder of ``qkcore plasticity`` inside a data root, and ``qkcore inspect``'s plot.
PLASTICITY_DIR = "plasticity"
INSPECT_PLOT = "inspect.png"
#: The PNG text key that names the run a plot was drawn from.
PNG_RUN_KEY = "qkcore:run_key"
#: Files ``qkcore plasticity`` writes (older versions wrote all but the last three).
PLASTICITY_FILES = ("head_bucket_plasticity.csv", "head_metrics.csv", "plasticity.png", "README.md",
                    "heatmap.png", PROVENANCE_FILE)
_FORMAT = 1
_STEP = re.compile(r"^(?:(?P<stage>.*?)[-_])?step[-_]?(?P<step>\d+)$")


def parse_checkpoint(revision: str | None) -> tuple[str | None, int | None]:
    """``(stage, step)`` of a checkpoint revision such as ``stage1-step-40000`` or ``lc-4k-to-32k-step-4000``.

    ``(None, None)`` when the revision names no step (``main``, a commit id).
    """
    match = _STEP.match(revision or "")
    if match is None:
        return None, None
    return match.group("stage") or None, int(match.group("step"))


@dataclass(frozen=True)
class RunFacts:
    """What a run's card says it is: identity and the settings a comparison must line up."""

    run_key: str | None = None
    model: str | None = None
    revision: str | None = None
    dataset: str | None = None
    sampler: dict[str, Any] = field(default_factory=dict)
    max_length: int | None = None
    dtype: str | None = None
    created: str | None = None
    nope_layers: tuple[int, ...] = ()
    rows: int | None = None
    configs: tuple[str, ...] = ()
    num_layers: int | None = None
    num_query_heads: int | None = None

    @classmethod
    def from_card(cls, text: str | None, model_index: int = 0) -> RunFacts:
        """The facts of the card ``text`` (empty facts for no card or a card of another tool)."""
        if not text:
            return cls()
        front = read_card(text)
        models = card_models(front)
        entry = models[model_index] if 0 <= model_index < len(models) else {}
        source = entry.get("source_dataset") or {}
        dataset = None
        if isinstance(source, dict) and source.get("path"):
            dataset = str(source["path"]) + (f" ({source['split']})" if source.get("split") else "")
        rope = entry.get("rope_layers") or {}
        coverage = ((front.get("qkcore") or {}) if isinstance(front.get("qkcore"), dict) else {}).get("coverage") or {}
        configs = tuple(sorted(c.get("config_name") for c in front.get("configs") or []
                               if isinstance(c, dict) and c.get("config_name")))
        max_length = (entry.get("tokenizer") or {}).get("max_length")
        return cls(
            run_key=card_run_key(text),
            model=entry.get("name") or entry.get("model_id"),
            revision=entry.get("revision"),
            dataset=dataset,
            sampler=dict(entry.get("sampler") or {}),
            max_length=_int(max_length),
            dtype=(entry.get("precision") or {}).get("dtype"),
            created=entry.get("created"),
            nope_layers=tuple(sorted(int(layer) for layer, applies in rope.items() if not applies)),
            rows=_int(coverage.get("rows")),
            configs=configs,
            num_layers=_int(entry.get("num_layers")),
            num_query_heads=_int(entry.get("num_query_heads")),
        )

    @property
    def bucket_size(self) -> int | None:
        """The sampler's (smallest) bucket size in tokens."""
        size = self.sampler.get("effective_min_bucket_size", self.sampler.get("min_bucket_size"))
        return int(size) if size is not None else None

    @property
    def stage(self) -> str | None:
        """The training stage the revision names (``stage1``, ``lc-4k-to-32k``), if any."""
        return parse_checkpoint(self.revision)[0]

    @property
    def step(self) -> int | None:
        """The checkpoint step the revision names, if any."""
        return parse_checkpoint(self.revision)[1]

    def sampler_text(self, keys: tuple[str, ...] = ("type", "base_rate", "min_bucket_size")) -> str:
        """The sampler settings ``keys`` in one phrase."""
        if not self.sampler:
            return "unknown"
        return ", ".join(f"{k}={self.sampler[k]}" for k in keys if k in self.sampler)


def _int(value: Any) -> int | None:
    return int(value) if value is not None else None


@dataclass(frozen=True)
class PlasticityProvenance:
    """``plasticity.json``: the run an output was computed from, and how."""

    source: str
    facts: RunFacts
    settings: dict[str, Any]
    qkcore_version: str

    @property
    def run_key(self) -> str | None:
        """The analysed run's key (``None``: its card recorded none)."""
        return self.facts.run_key

    def write(self, folder: Path) -> Path:
        """Write ``folder/plasticity.json`` and return its path."""
        data = {"format": _FORMAT, **asdict(self)}
        path = folder / PROVENANCE_FILE
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return path


def read_provenance(folder: Path) -> PlasticityProvenance | None:
    """The ``plasticity.json`` of ``folder``; ``None`` without one; an unreadable one is one clear error."""
    path = folder / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != _FORMAT:
            raise ValueError(f"unknown format {data.get('format')!r}")
        facts = dict(data["facts"])
        facts["nope_layers"] = tuple(facts.get("nope_layers") or ())
        facts["configs"] = tuple(facts.get("configs") or ())
        return PlasticityProvenance(str(data["source"]), RunFacts(**facts), dict(data["settings"]),
                                    str(data["qkcore_version"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise QkcoreError(f"{path} is unreadable ({exc}); rerun `qkcore plasticity` to write it again") from None


def png_run_key(path: Path) -> str | None:
    """The run key a qkcore plot records in its PNG text (``None``: none recorded, or not a PNG)."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return (getattr(image, "text", {}) or {}).get(PNG_RUN_KEY)
    except (OSError, ValueError):
        return None


def remove_stale_outputs(root: Path, run_key: str) -> list[str]:
    """Remove a data root's analysis outputs that were not made from run ``run_key``; return what went.

    ``DATA_ROOT/plasticity/`` (only the files ``qkcore plasticity`` writes; the folder when
    that empties it) unless its ``plasticity.json`` names this run, and ``DATA_ROOT/inspect.png``
    unless its PNG text names this run. Called when the root publishes: new data never
    sits beside outputs of the data it replaced.
    """
    removed: list[str] = []
    folder = root / PLASTICITY_DIR
    if folder.is_dir():
        try:
            current = read_provenance(folder)
        except QkcoreError:
            current = None
        if current is None or current.run_key != run_key:
            for name in PLASTICITY_FILES:
                path = folder / name
                if path.is_file():
                    path.unlink()
                    removed.append(f"{PLASTICITY_DIR}/{name}")
            try:
                folder.rmdir()
            except OSError:  # something else of the user's is in there: leave it
                pass
    plot = root / INSPECT_PLOT
    if plot.is_file() and png_run_key(plot) != run_key:
        plot.unlink()
        removed.append(INSPECT_PLOT)
    return removed
