"""``qkcore compare``: head plasticity of several runs, side by side.

A RUN is a local data root, a Hub ``owner/repo@branch``, a whole Hub repo (every branch its
``main`` index lists, :mod:`qkcore.hub_index`) or a ``qkcore plasticity`` output folder.

For each run the per-head plasticity comes from the same estimator as ``qkcore plasticity``
(:func:`qkcore.analysis.plasticity.run_plasticity`, written to ``OUT/runs/LABEL/``), or from an
existing output of it when that output's ``plasticity.json`` names exactly this run (same
run key) and the same analysis settings: the data root's own ``plasticity/``, or a previous
comparison's ``OUT/runs/LABEL/``.

Every input is checked before any compute: a RUN that is not a run, a data root whose files
contradict its card, two names for one run, duplicate labels, runs with no query head in
common, an unreadable order file are each one clear error. Settings that differ between runs
(sampler, bucket size, max length, dataset, dtype) are warned about and listed in the README.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
import structlog
import yaml

from qkcore.analysis.data import HubSource, LocalSource, PlasticityError
from qkcore.analysis.plasticity import HEADS_CSV, BUCKETS_CSV, PlasticityConfig, analysis_settings, run_plasticity
from qkcore.analysis.provenance import PLASTICITY_DIR, PROVENANCE_FILE, RunFacts, parse_checkpoint, read_provenance
from qkcore.layout import CARD_FILE, DATA_FILE, MANIFEST_FILE, config_name, configs_in, parse_config_name
from qkcore.manifest import read_manifest

__all__ = ["ComparedRun", "HeadRow", "RunRef", "compare_runs", "order_runs", "resolve_runs", "stage_sort_key"]

log = structlog.get_logger(__name__)

RunKind = Literal["root", "output", "hub"]
CSV_FILE = "head_plasticity.csv"
CSV_COLUMNS = ("run", "model", "revision", "stage", "step", "layer", "q_head", "k_head", "nope", "sliding_window",
               "plasticity", "n_queries")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class RunRef:
    """One run as the command line names it: ``given`` is the RUN text it came from."""

    given: str
    kind: RunKind
    location: str  # a folder, or a Hub repo id
    revision: str | None = None  # the Hub branch
    #: Found through a whole repo's index (not named one by one): an order file may leave it out.
    from_index: bool = False

    def describe(self) -> str:
        """Where the run is, for the README and messages."""
        return f"{self.location}@{self.revision}" if self.kind == "hub" else self.location


@dataclass(frozen=True)
class HeadRow:
    """One query head of one run: the comparison's unit."""

    layer: int
    q_head: int
    k_head: int
    nope: bool | None
    sliding_window: int | None
    plasticity: float
    n_queries: int


@dataclass
class ComparedRun:
    """A run with its facts, its label and place in the order, and its heads."""

    ref: RunRef
    facts: RunFacts
    label: str
    stage: str | None = None
    step: int | None = None
    heads: list[HeadRow] = field(default_factory=list)
    origin: str = ""  # "computed" or "reused FOLDER"

    @property
    def nope_layers(self) -> tuple[int, ...]:
        """The run's layers without RoPE (its card's ``rope_layers``)."""
        return self.facts.nope_layers


# -- naming the runs ---------------------------------------------------------------------------


def resolve_runs(given: Sequence[str], read_index: Callable[[str], list[Any]] | None = None) -> list[RunRef]:
    """Every run the RUN arguments name, in order; one that names no run is one clear error."""
    refs: list[RunRef] = []
    for text in given:
        path = Path(text)
        if path.is_dir():
            if (path / PROVENANCE_FILE).is_file():
                refs.append(RunRef(text, "output", text))
            elif (path / HEADS_CSV).is_file():
                raise PlasticityError(
                    f"RUN {text}: a plasticity output without {PROVENANCE_FILE} (written before qkcore recorded the run "
                    "it analysed), so it cannot be told apart from another run's: give its data root instead, or "
                    "rerun `qkcore plasticity` on it"
                )
            elif configs_in(path):
                refs.append(RunRef(text, "root", text))
            else:
                raise PlasticityError(
                    f"RUN {text}: not a run: the folder holds no lXXhYY[qk]/{DATA_FILE} and no plasticity output "
                    f"({PROVENANCE_FILE})"
                )
        elif "@" in text and _REPO.match(text.split("@", 1)[0]) and text.split("@", 1)[1]:
            repo, branch = text.split("@", 1)
            refs.append(RunRef(text, "hub", repo, branch))
        elif _REPO.match(text) and not path.exists():
            if read_index is None:
                from qkcore.hub_index import read_index as read_index
            refs += [RunRef(text, "hub", text, entry.branch, from_index=True) for entry in read_index(text)]
        else:
            raise PlasticityError(
                f"RUN {text}: not a run: no such folder, and not a Hub dataset (owner/repo or owner/repo@branch)"
            )
    if not refs:
        raise PlasticityError("no RUN given")
    return refs


def _card_text(ref: RunRef) -> tuple[str | None, Path | None]:
    """The card of a root or Hub run (text, local path)."""
    source = LocalSource(Path(ref.location)) if ref.kind == "root" else HubSource(ref.location, ref.revision)
    card = source.card()
    if card is None and ref.kind == "hub":
        raise PlasticityError(f"RUN {ref.given}: {ref.describe()} has no {CARD_FILE} (no such repo or branch, "
                              "or not a qkcore run)")
    return (card.read_text(encoding="utf-8") if card is not None else None), card


def _check_root(ref: RunRef, facts: RunFacts) -> None:
    """A data root's files must be the run its card and manifest describe."""
    root = Path(ref.location)
    on_disk = set(configs_in(root))
    if facts.configs and set(facts.configs) != on_disk:
        missing = sorted(set(facts.configs) - on_disk)
        extra = sorted(on_disk - set(facts.configs))
        raise PlasticityError(
            f"RUN {ref.given}: its files contradict its card: the card lists {len(facts.configs)} configs, the folder "
            f"holds {len(on_disk)} (missing {missing[:3]}, not in the card {extra[:3]}); rerun `qkcore sniff` on its "
            "config to repair the data root"
        )
    manifest = read_manifest(root / MANIFEST_FILE)
    if manifest is None:
        return
    if facts.run_key and manifest.run_key != facts.run_key:
        raise PlasticityError(
            f"RUN {ref.given}: its files contradict its card: {CARD_FILE} names run {facts.run_key}, {MANIFEST_FILE} "
            f"run {manifest.run_key}; rerun `qkcore sniff` on its config to repair the data root"
        )
    for name in sorted(on_disk):
        stats = manifest.configs.get(name)
        rows = pq.ParquetFile(root / name / DATA_FILE).metadata.num_rows
        if stats is None or stats.rows != rows:
            recorded = "no entry" if stats is None else f"{stats.rows} rows"
            raise PlasticityError(
                f"RUN {ref.given}: its files contradict its card: {name} holds {rows} rows, {MANIFEST_FILE} records "
                f"{recorded}; rerun `qkcore sniff` on its config to repair the data root"
            )


def describe_runs(refs: Sequence[RunRef], labels: Sequence[str] | None) -> list[ComparedRun]:
    """Read each run's facts (card or plasticity.json), check them, and label the runs."""
    if labels and len(labels) != len(refs):
        raise PlasticityError(f"--label given {len(labels)} time(s) for {len(refs)} run(s): give one label per run, "
                              f"in the order of the runs ({', '.join(r.describe() for r in refs)})")
    runs: list[ComparedRun] = []
    for i, ref in enumerate(refs):
        if ref.kind == "output":
            provenance = read_provenance(Path(ref.location))
            assert provenance is not None  # resolve_runs saw the file
            facts = provenance.facts
        else:
            text, _ = _card_text(ref)
            if text is None:  # a root without its card: nothing says which run it is
                raise PlasticityError(
                    f"RUN {ref.given}: no {CARD_FILE} (the card names the run and its heads); run `qkcore plasticity "
                    f"{ref.location} --num-q-heads N --num-kv-heads N --out DIR` and compare DIR instead"
                )
            facts = RunFacts.from_card(text)
            if ref.kind == "root":
                _check_root(ref, facts)
        stage, step = parse_checkpoint(facts.revision)
        runs.append(ComparedRun(ref, facts, labels[i] if labels else _default_label(ref), stage, step))
    if not labels:  # two folders of one name (".../out"): label them by their parent too
        names = [r.label for r in runs]
        for run in runs:
            if names.count(run.label) > 1 and run.ref.kind != "hub":
                run.label = "/".join(Path(run.ref.location).resolve().parts[-2:])
    seen: dict[str, ComparedRun] = {}
    for run in runs:
        key = run.facts.run_key
        if key and key in seen:
            raise PlasticityError(f"RUN {seen[key].ref.given} and RUN {run.ref.given} are the same run ({key}); "
                                  "name each run once")
        if key:
            seen[key] = run
    labels_seen: dict[str, RunRef] = {}
    for run in runs:
        if run.label in labels_seen:
            raise PlasticityError(f"two runs have the label '{run.label}' ({labels_seen[run.label].describe()} and "
                                  f"{run.ref.describe()}); give one --label per run")
        labels_seen[run.label] = run.ref
    return runs


def _default_label(ref: RunRef) -> str:
    if ref.kind == "hub":
        return str(ref.revision)
    path = Path(ref.location).resolve()
    if ref.kind == "output" and path.name == PLASTICITY_DIR:
        return path.parent.name
    return path.name


# -- the order ---------------------------------------------------------------------------------


def stage_sort_key(stage: str | None) -> tuple[int, tuple[Any, ...]]:
    """Pre-training ``stageN`` first (by N), then other stages (``lc-4k-to-32k`` before ``lc-32k-to-64k``)."""
    if stage is None:
        return (0, ())
    parts = tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", stage) if p)
    return (0 if re.fullmatch(r"stage\d+", stage) else 1, parts)


def order_runs(runs: list[ComparedRun], order: str | None) -> list[ComparedRun]:
    """The runs in the order asked: ``step``, ``name``, an order file, or (``None``) by step when every run has one."""
    if order is None:
        order = "step" if all(r.step is not None for r in runs) else "given"
    if order == "given":
        return list(runs)
    if order == "name":
        return sorted(runs, key=lambda r: r.label)
    if order == "step":
        lacking = [r for r in runs if r.step is None]
        if lacking:
            raise PlasticityError(
                f"--order step: run '{lacking[0].label}' has no checkpoint step (revision "
                f"{lacking[0].facts.revision!r}; steps are read from revisions like stage1-step-40000); "
                "use --order name, or --order FILE.yaml to give steps"
            )
        return sorted(runs, key=lambda r: (stage_sort_key(r.stage), r.step))
    return _order_file(runs, Path(order))


def _order_file(runs: list[ComparedRun], path: Path) -> list[ComparedRun]:
    """Runs ordered (and optionally labelled, staged, stepped) by a YAML file.

    The file is ``runs:``, a list whose items are a run (its label, RUN text, revision or run
    key) or a mapping ``{run: ..., label: ..., stage: ..., step: ...}``. Every run named on the
    command line is listed once; of a whole repo's runs (found through its index) the file
    picks the ones it lists.
    """
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PlasticityError(f"--order {path}: unreadable ({' '.join(str(exc).split())[:200]})") from None
    items = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise PlasticityError(f"--order {path}: expected a mapping with a non-empty list 'runs:' "
                              "(each item a run's label, or {run: LABEL, label: ..., stage: ..., step: ...})")
    ordered: list[ComparedRun] = []
    taken: set[int] = set()
    for n, item in enumerate(items, 1):
        spec = item if isinstance(item, dict) else {"run": item}
        unknown = set(spec) - {"run", "label", "stage", "step"}
        if unknown or "run" not in spec:
            raise PlasticityError(f"--order {path}: runs item {n}: expected keys run, label, stage, step; got {sorted(spec)}")
        name = str(spec["run"])
        matches = [i for i, r in enumerate(runs)
                   if name in (r.label, r.ref.given, r.ref.describe(), r.facts.revision, r.facts.run_key)]
        if len(matches) != 1:
            raise PlasticityError(f"--order {path}: runs item {n} ('{name}') names "
                                  f"{'no run' if not matches else f'{len(matches)} runs'}; runs: "
                                  f"{', '.join(r.label for r in runs)}")
        if matches[0] in taken:
            raise PlasticityError(f"--order {path}: runs item {n} ('{name}') names a run listed before")
        step = spec.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
            raise PlasticityError(f"--order {path}: runs item {n}: step must be a whole number >= 0, got {step!r}")
        run = runs[matches[0]]
        taken.add(matches[0])
        ordered.append(replace(run, label=str(spec.get("label", run.label)), stage=spec.get("stage", run.stage),
                               step=step if step is not None else run.step))
    left = [r.label for i, r in enumerate(runs) if i not in taken and not r.ref.from_index]
    if left:
        raise PlasticityError(f"--order {path}: does not list run(s) {', '.join(left)}; list every run once")
    dropped = [r.label for i, r in enumerate(runs) if i not in taken and r.ref.from_index]
    if dropped:  # a whole repo was named: the file picks its runs
        log.info("runs of the repo that the order file does not list are left out", runs=dropped)
    if len({r.label for r in ordered}) != len(ordered):
        raise PlasticityError(f"--order {path}: two runs get the same label")
    return ordered


# -- per-run plasticity: reuse or compute --------------------------------------------------------


def _settings(config: PlasticityConfig) -> dict[str, Any]:
    return analysis_settings(config, None, None, 0)


def _reusable(folder: Path, run: ComparedRun, settings: dict[str, Any]) -> bool:
    try:
        provenance = read_provenance(folder)
    except Exception:  # noqa: BLE001 - an unreadable old output is simply not reused
        return False
    return (provenance is not None and run.facts.run_key is not None and provenance.run_key == run.facts.run_key
            and provenance.settings == settings and (folder / HEADS_CSV).is_file() and (folder / BUCKETS_CSV).is_file())


def _safe(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label).strip("._") or "run"


def load_heads(folder: Path, nope_layers: tuple[int, ...]) -> list[HeadRow]:
    """The heads of a plasticity output folder (its two CSVs)."""
    n_queries: dict[tuple[int, int], int] = {}
    with (folder / BUCKETS_CSV).open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            key = (int(row["layer"]), int(row["q_head"]))
            n_queries[key] = n_queries.get(key, 0) + int(row["n_queries"] or 0)
    heads = []
    with (folder / HEADS_CSV).open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            layer, q = int(row["layer"]), int(row["q_head"])
            nope = {"true": True, "false": False}.get(row.get("nope", ""), None)
            if nope is None and nope_layers:
                nope = layer in nope_layers
            window = row.get("sliding_window") or ""
            heads.append(HeadRow(layer, q, int(row["k_head"]), nope, int(window) if window not in ("", "None") else None,
                                 float(row["plasticity"]), n_queries.get((layer, q), 0)))
    return heads


def check_output_settings(run: ComparedRun, config: PlasticityConfig) -> None:
    """A plasticity output given as a RUN must have been computed with the comparison's settings."""
    provenance = read_provenance(Path(run.ref.location))
    assert provenance is not None  # resolve_runs saw the file
    settings = _settings(config)
    if provenance.settings != settings:
        differ = {k: (provenance.settings.get(k), v) for k, v in settings.items() if provenance.settings.get(k) != v}
        flags = ", ".join(f"{k}: it used {a}, this comparison {b}" for k, (a, b) in differ.items())
        raise PlasticityError(f"RUN {run.ref.given}: computed with other settings ({flags}); pass the same settings, "
                              "or give its data root so it is computed again")


def analyse_run(run: ComparedRun, out: Path, config: PlasticityConfig, *, workers: int, progress: bool) -> None:
    """Fill ``run.heads``: from a reusable output, else computed into ``out/runs/LABEL``."""
    settings = _settings(config)
    target = out / "runs" / _safe(run.label)
    if run.ref.kind == "output":
        check_output_settings(run, config)
        folder = Path(run.ref.location)
        run.heads, run.origin = load_heads(folder, run.nope_layers), f"reused {folder}"
        return
    candidates = [target]
    if run.ref.kind == "root":
        candidates.insert(0, Path(run.ref.location) / PLASTICITY_DIR)
    for folder in candidates:
        if _reusable(folder, run, settings):
            log.info("reusing plasticity computed from this very run", run=run.label, folder=str(folder))
            run.heads, run.origin = load_heads(folder, run.nope_layers), f"reused {folder}"
            return
    source = LocalSource(Path(run.ref.location)) if run.ref.kind == "root" else HubSource(run.ref.location, run.ref.revision)
    log.info("computing plasticity", run=run.label, out=str(target))
    run_plasticity(source, target, config, workers=workers, progress=progress, title=f"attention plasticity: {run.label}")
    run.heads, run.origin = load_heads(target, run.nope_layers), "computed"


# -- differences and the whole comparison -----------------------------------------------------------


def differing_settings(runs: Sequence[ComparedRun]) -> dict[str, dict[str, str]]:
    """Setting name -> {run label: value} for each compared setting on which the runs differ."""
    getters: dict[str, Callable[[RunFacts], object]] = {
        "sampler": lambda f: f.sampler_text(("type", "base_rate")),  # its bucket size is the next line
        "bucket size": lambda f: f.bucket_size,
        "max length": lambda f: f.max_length,
        "dataset": lambda f: f.dataset,
        "dtype": lambda f: f.dtype,
    }
    out = {}
    for name, get in getters.items():
        values = {r.label: str(get(r.facts)) for r in runs}
        if len(set(values.values())) > 1:
            out[name] = values
    return out


def relative_buckets(runs: Sequence[ComparedRun]) -> bool | None:
    """Whether every run's bucket size is the same fraction of its max length (``None``: unknown for some run)."""
    ratios = set()
    for r in runs:
        if not r.facts.bucket_size or not r.facts.max_length:
            return None
        ratios.add(r.facts.max_length / r.facts.bucket_size)
    return len(ratios) == 1


def _captured(run: ComparedRun) -> set[tuple[int, int]] | None:
    """The query heads a run captured, known before any compute (``None``: its card lists no configs)."""
    if run.ref.kind == "output":
        return {(h.layer, h.q_head) for h in load_heads(Path(run.ref.location), run.nope_layers)}
    parsed = [parse_config_name(name) for name in run.facts.configs]
    return {(p[0], p[1]) for p in parsed if p and p[2] == "q"} or None


def check_heads_in_common(runs: Sequence[ComparedRun]) -> None:
    """Before any compute: runs whose captured query heads do not overlap are one clear error."""
    sets = [_captured(r) for r in runs]
    if all(s is not None for s in sets):
        _no_common_error(runs, sets, set.intersection(*sets))  # type: ignore[arg-type]


def _no_common_error(runs: Sequence[ComparedRun], sets: Sequence[set[tuple[int, int]]], common: set[tuple[int, int]]) -> None:
    if common:
        return
    listed = "; ".join(f"{r.label}: {len(s)} head(s) ({', '.join(config_name(l, q, 'q') for l, q in sorted(s)[:3])}"
                       f"{', ...' if len(s) > 3 else ''})" for r, s in zip(runs, sets))
    raise PlasticityError(f"the runs have no query head in common, so nothing can be compared ({listed}); "
                          "capture them with the same capture.head_sampling (count and seed)")


def common_heads(runs: Sequence[ComparedRun]) -> set[tuple[int, int]]:
    """(layer, query head) pairs every run has a defined plasticity for; none is one clear error."""
    sets = [{(h.layer, h.q_head) for h in r.heads if not math.isnan(h.plasticity)} for r in runs]
    common = set.intersection(*sets) if sets else set()
    _no_common_error(runs, sets, common)
    return common


def write_csv(path: Path, runs: Sequence[ComparedRun]) -> None:
    """The tidy table: one row per (run, query head)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for r in runs:
            for h in sorted(r.heads, key=lambda h: (h.layer, h.q_head)):
                writer.writerow([
                    r.label, r.facts.model or "", r.facts.revision or "", r.stage or "", "" if r.step is None else r.step,
                    h.layer, h.q_head, h.k_head, "" if h.nope is None else str(h.nope).lower(),
                    "" if h.sliding_window is None else h.sliding_window,
                    "nan" if math.isnan(h.plasticity) else repr(h.plasticity), h.n_queries,
                ])


@dataclass(frozen=True)
class Comparison:
    """What ``qkcore compare`` produced."""

    runs: list[ComparedRun]
    common: set[tuple[int, int]]
    differences: dict[str, dict[str, str]]
    files: list[Path]


def compare_runs(
    given: Sequence[str],
    out: Path,
    config: PlasticityConfig = PlasticityConfig(),
    *,
    order: str | None = None,
    labels: Sequence[str] | None = None,
    workers: int = 1,
    progress: bool = True,
    read_index: Callable[[str], list[Any]] | None = None,
) -> Comparison:
    """Compare the runs ``given`` names; write the CSV, the figures and the README into ``out``."""
    from qkcore.analysis.compare_plots import plot_distribution, plot_heatmap_grid, plot_trajectory
    from qkcore.analysis.compare_readme import render_compare_readme

    refs = resolve_runs(given, read_index)
    runs = order_runs(describe_runs(refs, labels), order)
    check_heads_in_common(runs)
    for run in runs:
        if run.ref.kind == "output":
            check_output_settings(run, config)
    differences = differing_settings(runs)
    for name, values in differences.items():
        log.warning("runs differ in a setting", setting=name, values=values)
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        analyse_run(run, out, config, workers=workers, progress=progress)
    common = common_heads(runs)
    if any(len(r.heads) != len(common) for r in runs):
        log.warning("runs captured different heads; the figures along the runs use the heads all have",
                    common=len(common), per_run={r.label: len(r.heads) for r in runs})
    files = [out / CSV_FILE]
    write_csv(files[0], runs)
    files.append(plot_heatmap_grid(out / "heatmaps.png", runs))
    files.append(plot_trajectory(out / "trajectory.png", runs, common))
    files.append(plot_distribution(out / "distribution.png", runs, common))
    readme = out / "README.md"
    readme.write_text(render_compare_readme(runs, common, differences, relative_buckets(runs), config,
                                            [f.name for f in files]), encoding="utf-8")
    files.append(readme)
    return Comparison(runs, common, differences, files)
