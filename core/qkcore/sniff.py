"""``qkcore sniff``: one capture run, from its checks to its published files.

The order is the point: nothing is written before everything that can fail early has
been checked, and nothing published changes before the new run is complete.

====  =============================================================  ==============================
step  what                                                           where
====  =============================================================  ==============================
1     config checks (sampler, what to capture): no I/O               :func:`check_config`
2     the data root: usable, locked (one process per root)           ``output/``
3     inputs: documents checked, tokenizer, architecture, plugin,    :func:`load_inputs`,
      and the run's identity                                         ``identity.py``
4     the Hub branch when configured: token, what it holds           ``hub.py``
5     the rule: complete / pull / publish / resume / fresh, or       ``root_policy.py``
      refuse
6     the model and the capture plan; a free-disk warning            :class:`Sniffer`
7     capture, committing progress with the staged rows              ``capture.py``, ``writer.py``
8     finish: final files, card and manifest into ``.qkcore/final``  :meth:`_Run.finish`
      (journaled)
9     publish into the root, then push                               ``output/``, ``hub.py``
====  =============================================================  ==============================
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pluggy
import structlog
import torch
from tqdm.auto import tqdm

from qkcore import __version__, tensor_parallel
from qkcore.background import BackgroundWriter
from qkcore.batching import Batch, tokenize_batches
from qkcore.capture import CaptureSession
from qkcore.card import ModelEntry, card_models, card_run_key, read_card, render_card
from qkcore.config import ConfigError, SniffConfig, config_to_dict, resolve_dtype
from qkcore.distributed import Ranks, init_ranks, shutdown
from qkcore.errors import QkcoreError
from qkcore.example_ids import EXAMPLE_ID_RULE, find_int32_collisions
from qkcore.fsutil import remove_tree, sha256_file, write_text_durably
from qkcore.hub import GITATTRIBUTES, HubSync, hub_sync, main_branch_readme
from qkcore.identity import dataset_fingerprint, run_identity, run_key
from qkcore.layers import AttentionLayer
from qkcore.layout import CARD_FILE, MANIFEST_FILE, config_file
from qkcore.logs import progress_disable
from qkcore.manifest import Manifest, read_manifest
from qkcore.output import DataRoot, FileEntry, Record, command_line, file_entry, open_output
from qkcore.planning import build_sampler, plan_capture
from qkcore.plugins import Family, installed_summary, make_plugin_manager, resolve_family
from qkcore.root_policy import BranchView, Decision, RootView, decide
from qkcore.samplers import Sampler
from qkcore.sources.documents import DocumentCheck, check_columns, check_documents, iter_documents, open_dataset
from qkcore.sources.model import load_architecture, load_model, model_identity, precision, resolve_device
from qkcore.sources.tokenizer import load_tokenizer, tokenizer_identity
from qkcore.writer import CapturedChunk, ConfigStats, DatasetWriter, StagingConflict, read_journal

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass
class SniffResult:
    """What a run did and what the data root now publishes."""

    data_root: Path
    rows: dict[str, int]
    documents: int
    tokens: int
    action: str = "captured"  # captured, resumed, already complete, pulled, published


@dataclass
class RunState:
    """A capture's progress: the staging journal's ``state``, committed with the staged rows.

    ``phase`` moves ``capturing`` -> ``captured`` (every document done; under torchrun,
    the ranks merged) -> ``finalized`` (final files, card and manifest waiting in
    ``.qkcore/final``, listed in ``files``).
    """

    run_key: str
    identity: dict[str, Any]
    world_size: int = 1
    replace: bool = False  # approved with --replace: publishing removes another run's files
    phase: str = "capturing"
    next_index: int = 0
    documents: int = 0
    skipped: int = 0  # documents without tokens (empty texts)
    tokens: int = 0
    example_ids: list[int] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo path -> {size, sha256}
    summary: dict[str, Any] = field(default_factory=dict)

    def to_journal(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_journal(cls, data: dict[str, Any]) -> RunState:
        return cls(**data)


@dataclass
class RunInputs:
    """Everything a run needs before its model: checked, loaded, and the run's identity."""

    cfg: SniffConfig
    pm: pluggy.PluginManager
    sampler: Sampler
    device: torch.device
    data: Any
    documents: DocumentCheck
    tokenizer: Any
    architecture: Any  # the transformers config, overrides applied
    family: Family
    identity: dict[str, Any]
    run_key: str


def check_config(cfg: SniffConfig, pm: pluggy.PluginManager) -> Sampler:
    """The checks that need no I/O: what to capture, and the sampler."""
    where = cfg.source or "<config>"
    if not cfg.capture.capture_queries and not cfg.capture.capture_keys:
        raise ConfigError(
            f"{where}: capture.capture_queries and capture.capture_keys are both false: nothing would be captured"
        )
    return build_sampler(pm, cfg)


def load_inputs(
    cfg: SniffConfig,
    pm: pluggy.PluginManager,
    ranks: Ranks | None = None,
    hash_cache: dict[str, str] | None = None,
    sampler: Sampler | None = None,
) -> RunInputs:
    """Check and load everything but the model weights, and compute the run's identity.

    ``hash_cache`` maps ``path|size|mtime_ns`` to a file's sha256, so unchanged weight
    files are not hashed again (the run keeps it in the data root). ``sampler``: the one
    :func:`check_config` already built, if the caller ran it.
    """
    ranks = ranks or Ranks()
    sampler = sampler or check_config(cfg, pm)
    device = ranks.device(resolve_device(cfg.model.device_map))
    data = open_dataset(cfg.dataset)
    check_columns(data, cfg.dataset)
    documents = check_documents(data, cfg.dataset)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
    architecture = load_architecture(cfg.model)
    family = resolve_family(pm, architecture.model_type)
    tensor_parallel.check_architecture(cfg, architecture, family.model_type)  # issue 19: before any weights load
    identity = run_identity(
        cfg,
        dataset=dataset_fingerprint(cfg.dataset),
        model=model_identity(cfg.model, architecture, hash_cache),
        tokenizer=tokenizer_identity(cfg.tokenizer, cfg.model, hash_cache),
        device_type=device.type,
    )
    return RunInputs(cfg, pm, sampler, device, data, documents, tokenizer, architecture, family, identity, run_key(identity))


class Sniffer:
    """A loaded run: its inputs plus the model, the plugin's capture plan and the capture session.

    :meth:`instrumented` and :meth:`capture_batch` expose the forward-with-capture step
    alone (the benchmark uses them); :meth:`capture` runs every document into a writer.
    """

    def __init__(self, inputs: RunInputs, ranks: Ranks | None = None) -> None:
        self.inputs = inputs
        self.cfg = cfg = inputs.cfg
        self.ranks = ranks or Ranks()
        self.sampler, self.device, self.data, self.tokenizer = inputs.sampler, inputs.device, inputs.data, inputs.tokenizer
        self.family = inputs.family
        model_class = self.family.hooks.qkcore_model_class(config=inputs.architecture)
        dtype = resolve_dtype(cfg.model.dtype)
        if self.ranks.tensor_parallel_size > 1:  # issue 19: the model split by heads over the rank's group
            with tensor_parallel.group_mesh(self.ranks, self.device) as extra:
                self.model = load_model(cfg.model, inputs.architecture, model_class, dtype, self.device, extra)
        else:
            self.model = load_model(cfg.model, inputs.architecture, model_class, dtype, self.device)
        self.plan = plan_capture(self.model, self.family, cfg, installed_summary(inputs.pm))
        # issue 19: the card describes the whole plan; this rank captures the heads it holds.
        captured = (
            tensor_parallel.shard_plan(self.plan, self.family, self.ranks)
            if self.ranks.tensor_parallel_size > 1 else self.plan
        )
        self.backbone = self.family.hooks.qkcore_backbone(model=self.model)
        self.model_name = cfg.model.name or f"random-{self.family.model_type}"
        self.session = CaptureSession(
            captured, self.sampler, postprocess_query=self._postprocess,
            max_rows=cfg.capture.max_rows_per_batch,
            token_strings=self.tokenizer.convert_ids_to_tokens if cfg.capture.capture_token_strings else None,
        )
        # Autocast only where it changes something: a bf16 model under bf16 autocast would
        # only add casts (and cached weight copies) to the forward.
        autocast_dtype = resolve_dtype(cfg.inference.autocast_dtype)
        self.model_dtype = next(self.model.parameters()).dtype
        self._autocast_dtype = (
            autocast_dtype if self.device.type == "cuda" and autocast_dtype not in ("auto", self.model_dtype) else None
        )
        log.info(
            "capture planned",
            model=self.model_name,
            plugin=self.family.plugin_name,
            layers=len(self.plan.layers),
            query_heads=sum(len(h) for (_, kind), h in self.plan.heads.items() if kind == "q"),
            key_heads=sum(len(h) for (_, kind), h in self.plan.heads.items() if kind == "k"),
            sampler=self.sampler.name,
            device=str(self.device),
        )

    @classmethod
    def from_config(cls, cfg: SniffConfig, pm: pluggy.PluginManager | None = None) -> Sniffer:
        """Check, load and plan ``cfg`` in this process (no data root is involved)."""
        return cls(load_inputs(cfg, pm or make_plugin_manager()))

    def _postprocess(self, layer: AttentionLayer, query: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        result = self.family.hooks.qkcore_postprocess_query(layer=layer, query=query, positions=positions)
        return query if result is None else result

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Tokenised, right-padded batches of this rank's documents from dataset index ``start`` on."""
        batch_size = self.cfg.inference.batch_size
        documents = (
            doc for doc in iter_documents(self.data, self.cfg.dataset)
            if doc.index >= start and self.ranks.owns(doc.index, batch_size)
        )
        return tokenize_batches(documents, self.tokenizer, max_length=self.cfg.tokenizer.max_length, batch_size=batch_size)

    @contextmanager
    def instrumented(self) -> Iterator[Sniffer]:
        """Route the model's attention through the capture (restored on exit)."""
        with self.session.attached(self.model, self.family.hooks.qkcore_instrument), torch.inference_mode():
            yield self

    def prepared_batches(self, start: int = 0) -> Iterator[tuple[Batch, Any]]:
        """:meth:`batches` with their keep selections, prepared one batch ahead on a thread.

        Tokenising the next documents and drawing their keep masks overlaps the
        current forward instead of stalling the accelerator between forwards.
        """
        batches = self.batches(start)

        def prepare() -> tuple[Batch, Any] | None:
            batch = next(batches, None)
            return None if batch is None else (batch, self.session.select(batch.example_ids, batch.lengths, batch.input_ids))

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkcore-prefetch") as pool:
            upcoming = pool.submit(prepare)
            while (item := upcoming.result()) is not None:
                upcoming = pool.submit(prepare)
                yield item

    def capture_batch(self, batch: Batch, selections: Any = None) -> list[CapturedChunk]:
        """Run the backbone on ``batch`` (inside :meth:`instrumented`) and return its kept rows."""
        self.session.begin_batch(batch.example_ids, batch.lengths, selections, device=self.device, input_ids=batch.input_ids)
        input_ids = batch.input_ids.to(self.device, non_blocking=True)
        if self._autocast_dtype is not None:
            with torch.autocast(device_type="cuda", dtype=self._autocast_dtype):
                self.backbone(input_ids=input_ids, use_cache=False)
        else:
            self.backbone(input_ids=input_ids, use_cache=False)
        return self.session.end_batch()

    def capture(self, writer: DatasetWriter, state: RunState, start: int | None = None) -> None:
        """Capture this rank's documents from ``state.next_index`` on, committing progress as it goes.

        ``start`` (tensor parallelism, issue 19): run the forwards from there, writing only the
        batches from ``state.next_index`` on (the group's ranks run every forward together).

        On a terminal one progress line shows documents, tokens/s and the time left; without
        one (a log file, ``--quiet``, ``--json-logs``) each commit logs a progress line instead.
        A line per batch is logged at debug level.
        """
        total = self.inputs.documents.documents
        batch_size = self.cfg.inference.batch_size
        share = None if total is None else sum(1 for i in range(total) if self.ranks.owns(i, batch_size))
        progress = tqdm(
            total=share, initial=state.documents + state.skipped, unit="doc", dynamic_ncols=True,
            desc=f"sniff[{self.ranks.rank}]" if self.ranks.distributed else "sniff", disable=progress_disable(),
        )
        started, tokens_before, last_commit = time.perf_counter(), state.tokens, time.monotonic()
        # Rows are handed to a writer thread: spills and commits overlap the next forward.
        background = BackgroundWriter(writer, max_pending_bytes=int(self.cfg.output.flush_threshold_mb * 2**20))
        debug_every = self.cfg.inference.debug_log_every_n_batches or 1
        warned: set[str] = set()
        try:
            with self.instrumented():
                first = state.next_index if start is None else min(start, state.next_index)
                for count, (batch, selections) in enumerate(self.prepared_batches(start=first), 1):
                    if batch.next_index <= state.next_index:  # issue 19: written already; the group needs the forward
                        if batch.lengths:
                            self.capture_batch(batch, selections)
                        continue
                    if batch.lengths:  # a batch of empty texts has nothing to run
                        for chunk in self.capture_batch(batch, selections):
                            _warn_nonfinite(chunk, warned)
                            background.add(chunk)
                    state.documents += len(batch.lengths)
                    state.skipped += batch.skipped
                    state.tokens += batch.tokens
                    state.example_ids.extend(batch.example_ids)
                    state.next_index = batch.next_index
                    committed = time.monotonic() - last_commit >= self.cfg.output.commit_every_s
                    if committed:
                        background.commit(state.to_journal())
                        last_commit = time.monotonic()
                    progress.update(len(batch.lengths) + batch.skipped)
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    rate = (state.tokens - tokens_before) / elapsed
                    progress.set_postfix(tok_s=f"{rate:,.0f}", refresh=False)
                    if count % debug_every == 0:
                        log.debug("batch captured", batch_documents=len(batch.lengths), batch_tokens=batch.tokens,
                                  documents=state.documents, tokens=state.tokens, next_index=state.next_index)
                    if committed and progress.disable:  # no live line: say how far the run is at each commit
                        log.info("progress", documents=state.documents, of=share, tokens=state.tokens,
                                 tok_s=round(rate), elapsed_s=round(elapsed, 1))
            background.drain()
        finally:
            background.stop()
            progress.close()
        if state.skipped:
            log.warning("documents without tokens (empty texts) were skipped", skipped=state.skipped)

    def model_entry(self, state: RunState, stats: dict[str, ConfigStats]) -> ModelEntry:
        """The card's description of this run: model, settings, heads, counts."""
        import transformers

        cfg, family, plan = self.cfg, self.family, self.plan
        layers: list[AttentionLayer] = family.hooks.qkcore_attention_layers(model=self.model)
        notes: list[str] = []
        for provided in family.hooks.qkcore_card_notes(model=self.model, layers=layers, plan=plan):
            notes.extend(provided or [])
        if family.is_fallback:
            notes.append(f"No plugin handles model_type '{family.model_type}': captured by the generic fallback.")
        collisions = find_int32_collisions(set(state.example_ids))
        if collisions:
            log.warning("example ids collide in the int32 column", collisions=dict(list(collisions.items())[:5]))
            notes.append(f"{len(collisions)} int32 example_id value(s) are shared by distinct documents.")
        settings = config_to_dict(cfg)
        dataset = dict(settings["dataset"])
        dataset["path"] = _display_path(cfg.dataset.path)
        dataset.pop("streaming", None)
        return ModelEntry(
            name=self.model_name,
            revision=cfg.model.revision,
            model_type=family.model_type,
            plugin=f"{family.plugin_name} {family.plugin_version}",
            num_layers=len(layers),
            num_query_heads=layers[0].num_query_heads,
            num_key_value_heads=layers[0].num_key_value_heads,
            head_dim=layers[0].head_dim,
            source_dataset=dataset,
            sampler=self.sampler.describe(),
            capture=dict(settings["capture"]),
            selected_heads={layer: heads for (layer, kind), heads in sorted(plan.heads.items()) if kind == "q"},
            key_heads={layer: heads for (layer, kind), heads in sorted(plan.heads.items()) if kind == "k"},
            key_head_of_query={layer: dict(sorted(m.items())) for layer, m in sorted(plan.key_head_of.items())},
            layer_kinds={layer.index: layer.kind for layer in layers},
            sliding_windows={layer.index: layer.sliding_window for layer in layers},
            rope_layers={index: site.applies_rope for index, site in sorted(plan.rope_sites.items())},
            notes=notes,
            example_id_rule=EXAMPLE_ID_RULE,
            documents=state.documents,
            tokens=state.tokens,
            qkcore_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            skipped_documents=state.skipped,
            nonfinite_rows=sum(s.nonfinite_rows for s in stats.values()),
            weights=self.inputs.identity["model"]["weights"],
            precision={
                **precision(cfg.model, self.device, self.inputs.architecture).card(),
                "dtype": str(self.model_dtype).removeprefix("torch."),
                "attn_implementation": cfg.model.attn_implementation,
                "device": self.device.type,
                "autocast": None if self._autocast_dtype is None else str(self._autocast_dtype).removeprefix("torch."),
                "batch_size": cfg.inference.batch_size,
                **tensor_parallel.card_fields(self.ranks),  # issue 19
            },
            tokenizer={
                "name": cfg.tokenizer.name or cfg.model.name,
                "revision": cfg.tokenizer.revision,
                "max_length": cfg.tokenizer.max_length,
            },
            versions={"torch": str(torch.__version__), "transformers": str(transformers.__version__)},
            head_selection=plan.head_selection + (f" NOTE: {plan.head_selection_note}" if plan.head_selection_note else ""),
            run_key=state.run_key,
        )

    def disk_needed_bytes(self) -> float:
        """An upper bound of the free disk the capture needs (every document at ``tokenizer.max_length``).

        :func:`qkcore.plan.disk_needed_bytes`: staging parts plus final files, one spill per batch at most.
        """
        from qkcore.layout import config_name
        from qkcore.plan import disk_needed_bytes, expected_rows

        documents = self.inputs.documents.documents or self.cfg.dataset.max_samples or 0
        per_config = expected_rows(self.sampler, {self.cfg.tokenizer.max_length: documents}) if documents else 0.0
        rows, head_dims = {}, {}
        for (index, kind), heads in self.plan.heads.items():
            for head in heads:
                name = config_name(index, head, kind)
                rows[name], head_dims[name] = per_config, self.plan.layers[index].head_dim
        batches = -(-documents // self.cfg.inference.batch_size) if documents else 1
        return disk_needed_bytes(rows, head_dims, spills=max(1, batches))


def _require_tokens(state: RunState) -> None:
    """Refuse a run whose documents, all read, held no token at all (every text empty)."""
    if state.documents == 0:
        raise QkcoreError(
            f"dataset.text_column: none of the {state.skipped} documents read has any tokens; nothing to capture"
        )


def _warn_nonfinite(chunk: CapturedChunk, warned: set[str]) -> None:
    """Warn, once per (layer, kind), as soon as captured rows hold NaN or infinity (usually an fp16 overflow)."""
    import numpy as np

    key = f"l{chunk.layer:02d}{chunk.kind}"
    if key in warned or chunk.vectors.size == 0 or np.isfinite(chunk.vectors).all():
        return
    warned.add(key)
    rows = int((~np.isfinite(chunk.vectors).all(axis=2)).sum())
    log.warning("captured rows hold NaN or infinity (an fp16 overflow? use bfloat16 or float32); counted in the card",
                layer=chunk.layer, kind=chunk.kind, rows_in_batch=rows)


def _summary_of_card(card: str, manifest: Manifest) -> dict[str, Any]:
    """A pulled run's record summary, from its card (model, date) and manifest (counts)."""
    models = card_models(read_card(card))
    entry = models[0] if models else {}
    return {"model": entry.get("name"), "created": entry.get("created"), "documents": manifest.documents,
            "tokens": manifest.tokens}


def _display_path(path: str) -> str:
    """A dataset path for the card: a Hub id as is, a local path by its name (no machine's directories)."""
    local = Path(path)
    return local.name if local.is_absolute() else path


# --------------------------------------------------------------------------- the run


def run_sniff(
    cfg: SniffConfig,
    pm: pluggy.PluginManager | None = None,
    hub_api: Any = None,
    restart: bool = False,
    replace: bool = False,
) -> SniffResult:
    """Run the capture ``cfg`` describes into its data root, by the rule of :mod:`qkcore.root_policy`.

    ``restart`` discards staged progress; ``replace`` lets this run replace another run's
    files (and its Hub branch) when it publishes. Under torchrun every rank calls this.
    """
    ranks = init_ranks()
    structlog.contextvars.bind_contextvars(rank=ranks.rank)
    try:
        ranks = tensor_parallel.with_groups(ranks, cfg)  # issue 19: K checked before anything else
        pm = pm or make_plugin_manager()
        sampler = check_config(cfg, pm)  # before the data root is touched
        root = open_output(cfg.output)
        with ExitStack() as stack:
            if ranks.is_main:
                stack.callback(root.forget_if_unused)

            def lock() -> None:
                root.check_usable()
                stack.enter_context(root.locked(command_line()))

            _agree(ranks, lock)
            return _Run(cfg, pm, root, ranks, hub_sync(cfg.output, api=hub_api), restart, replace).execute(sampler)
    finally:
        shutdown(ranks)


def _agree(ranks: Ranks, step: Callable[[], T]) -> T:
    """Run ``step`` on rank 0 and hand its result, or its error, to every rank (no rank waits forever)."""
    if not ranks.distributed:
        return step()
    outcome: tuple[str, Any] = ("ok", None)
    if ranks.is_main:
        try:
            outcome = ("ok", step())
        except (QkcoreError, ConfigError) as exc:
            outcome = ("error", str(exc))
        except BaseException as exc:
            ranks.broadcast(("error", f"rank 0 failed: {type(exc).__name__}: {exc}"))
            raise
    outcome = ranks.broadcast(outcome)
    if outcome[0] == "error":
        raise QkcoreError(outcome[1])
    return outcome[1]


class _HashCache:
    """sha256 of weight files by ``path|size|mtime_ns``, kept in the data root: a rerun does not rehash 16 GB."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.values: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.values = {}
        self._before = dict(self.values)

    def save(self) -> None:
        if self.values != self._before and self.path.parent.is_dir():
            write_text_durably(self.path, json.dumps(self.values, indent=1, sort_keys=True))


class _Run:
    """One ``qkcore sniff``, holding the data root's lock (see the module docstring for the steps)."""

    def __init__(
        self, cfg: SniffConfig, pm: pluggy.PluginManager, root: DataRoot, ranks: Ranks, hub: HubSync | None,
        restart: bool, replace: bool,
    ) -> None:
        self.cfg, self.pm, self.root, self.ranks, self.hub = cfg, pm, root, ranks, hub
        self.restart, self.replace = restart, replace
        self.started = time.perf_counter()
        self.branch: Any = None  # the hub preflight's BranchState

    def execute(self, sampler: Sampler) -> SniffResult:
        cache = _HashCache(self.root.work_dir / "hashes.json")
        inputs = load_inputs(self.cfg, self.pm, self.ranks, cache.values, sampler)
        if self.ranks.is_main:
            cache.save()
        decision, merged = _agree(self.ranks, lambda: self.decide(inputs))
        for note in decision.notes:
            log.warning(note)
        if not self.ranks.is_main and decision.action in ("complete", "pull", "publish"):
            return SniffResult(self.cfg.output.data_root, {}, 0, 0, decision.action)
        if decision.action == "complete":
            return self.already_complete()
        if decision.action == "pull":
            return self.pull(inputs)
        if decision.action == "publish":
            return self.publish_staged()
        return self.capture(inputs, decision, merged)

    # -- step 5: the rule ------------------------------------------------------
    def decide(self, inputs: RunInputs) -> tuple[Decision, bool]:
        """Rank 0: read the root and the branch, apply the rule; discard what it says to discard."""
        root = self.root
        staged = read_journal(root.staging_dir) if root.staging_dir.exists() else None
        if staged is None:  # a staging folder without a journal holds nothing committed (killed early, or emptied)
            remove_tree(root.staging_dir)
        record = root.read_record()
        staged_ranks = root.staged_ranks()
        ranks_key = None
        if staged_ranks:
            first = read_journal(root.rank_staging(staged_ranks[0]))
            ranks_key = (first or {}).get("run_key")
        view = RootView(
            path=root.location,
            record=record,
            dataset_files=tuple(root.dataset_files()),
            staged=staged,
            ranks=tuple(staged_ranks),
            ranks_run_key=ranks_key,
            problems=tuple(root.verify(record)) if record is not None and record.state == "complete" else (),
        )
        branch = None
        if self.hub is not None:
            self.branch = self.hub.preflight()
            branch = branch_view(self.hub, self.branch)
        decision = decide(
            view, inputs.run_key, inputs.identity, restart=self.restart, replace=self.replace,
            world_size=self.ranks.world_size, branch=branch,
        )
        if decision.discard_staged or self.restart:
            root.discard_work()
            staged = None
        merged = staged is not None and (staged.get("state") or {}).get("phase") in ("captured", "finalized")
        return decision, merged

    # -- the actions -----------------------------------------------------------
    def already_complete(self) -> SniffResult:
        record = self.root.read_record()
        assert record is not None
        log.info("already complete: the files of this run are unchanged; nothing to do", data_root=self.root.location)
        if self.hub is not None and not self._pushed_to_target(record):
            log.info("pushing: this run was never pushed to its Hub branch", target=f"{self.hub.repo_id}@{self.hub.branch}")
            self.push(record)
        return self._result(record, "already complete")

    def pull(self, inputs: RunInputs) -> SniffResult:
        """The branch holds this very run: download it instead of capturing it again (verified file by file)."""
        assert self.hub is not None and self.branch is not None
        root, final = self.root, self.root.final_dir
        remove_tree(final)
        final.mkdir(parents=True)
        where = f"{self.hub.repo_id}@{self.hub.branch}"
        self.hub.download(self.branch, [MANIFEST_FILE], final)
        manifest = read_manifest(final / MANIFEST_FILE)
        if manifest is None or manifest.run_key != inputs.run_key:
            raise QkcoreError(f"the Hub branch {where} has no manifest for run {inputs.run_key}; use --replace to capture it again")
        wanted = manifest.file_hashes()
        self.hub.download(self.branch, sorted(wanted), final)
        for name, (size, sha) in wanted.items():
            if sha256_file(final / name) != sha or (size is not None and (final / name).stat().st_size != size):
                raise QkcoreError(f"{name} pulled from {where} does not match its manifest; the branch is damaged")
        files = {name: file_entry(final / name) for name in [*wanted, MANIFEST_FILE]}
        record = Record("publishing", manifest.run_key, manifest.identity, files,
                        summary=_summary_of_card((final / CARD_FILE).read_text(encoding="utf-8"), manifest),
                        hub=self._hub_target(self.branch.commit))
        record = root.publish(record)
        log.info("pulled: the Hub branch already holds this run", branch=where, configs=len(manifest.configs))
        return self._result(record, "pulled")

    def publish_staged(self) -> SniffResult:
        """This run finished but was not (fully) published: publish it, then push."""
        journal = read_journal(self.root.staging_dir)
        if journal is None:  # the record says "publishing" and its journal is gone: the record has everything
            record = self.root.read_record()
            assert record is not None
            log.info("resuming the publish of a finished run", run=record.run_key)
            record = self.root.publish(record)
            if self.hub is not None:
                self.push(record)
            return self._result(record, "published")
        writer = DatasetWriter(self.root.staging_dir, run_key=str(journal["run_key"]))
        state = RunState.from_journal(writer.resumed_state)
        log.info("resuming the publish of a finished run", run=state.run_key)
        record = self.publish(writer, state)
        return self._result(record, "published")

    def capture(self, inputs: RunInputs, decision: Decision, merged: bool) -> SniffResult:
        """Steps 6 to 9: the model, the capture (or its resume), finish, publish, push."""
        ranks, root = self.ranks, self.root
        sniffer = Sniffer(inputs, ranks)
        if ranks.is_main:
            self._check_disk(sniffer)
        fresh = RunState(inputs.run_key, inputs.identity, ranks.world_size, decision.replace)
        if ranks.distributed:
            state = fresh
            if not merged:  # every rank captures its batches into its own staging
                rank_writer, state = self._capture_into(sniffer, root.rank_staging(ranks.rank), fresh, whole_run=False)
                rank_writer.abort()  # the state is committed; release the writer's buffers
            shares = ranks.gather(state.to_journal())
            ranks.barrier()
            if not ranks.is_main:
                return SniffResult(self.cfg.output.data_root, {}, state.documents, state.tokens, "captured")
            writer, state = self._merge_ranks(shares, fresh)
        else:
            writer, state = self._capture_into(sniffer, root.staging_dir, fresh, whole_run=True)
        try:
            if state.phase == "captured":
                self.finish(sniffer, writer, state)
        except BaseException:
            writer.abort()
            raise
        record = self.publish(writer, state)
        return self._result(record, "captured")

    def _open_writer(self, staging: Path, key: str) -> DatasetWriter:
        try:
            return DatasetWriter(
                staging, flush_threshold_mb=self.cfg.output.flush_threshold_mb,
                row_group_size=self.cfg.output.write_batch_size, run_key=key,
                token_strings=self.cfg.capture.capture_token_strings,
            )
        except StagingConflict as exc:  # the rule checked the staged key: this is a damaged staging
            raise QkcoreError(f"{exc}; rerun with --restart to discard it") from None

    def _capture_into(
        self, sniffer: Sniffer, staging: Path, fresh: RunState, *, whole_run: bool
    ) -> tuple[DatasetWriter, RunState]:
        """Capture (or resume capturing) into ``staging`` until every document is done; commit that.

        ``whole_run``: this process captures the whole run (not one torchrun rank's share,
        which may hold no document), so a run without a single token is refused here.
        """
        writer = self._open_writer(staging, fresh.run_key)
        state = RunState.from_journal(writer.resumed_state) if writer.resumed_state else fresh
        if writer.resumed_state is not None:
            log.info("resuming", documents_done=state.documents, next_index=state.next_index, phase=state.phase)
        # issue 19: a tensor-parallel group resumes together (a collective; the run itself without TP)
        start = tensor_parallel.group_start(self.ranks, state.phase == "capturing", state.next_index)
        if start is None:
            return writer, state
        try:
            sniffer.capture(writer, state, start)
            if whole_run:
                _require_tokens(state)
            state.phase = "captured"
            writer.commit(state.to_journal())
        except BaseException:
            # Nothing captured at all (every text empty): leave nothing behind; else keep the last commit.
            writer.discard() if state.documents == 0 and whole_run else writer.abort()
            raise
        return writer, state

    def _merge_ranks(self, shares: list[dict[str, Any]], fresh: RunState) -> tuple[DatasetWriter, RunState]:
        """Rank 0: adopt every rank's committed parts into one writer; committed before anything else."""
        writer = self._open_writer(self.root.staging_dir, fresh.run_key)
        if writer.resumed_state is not None:  # merged before a crash: the ranks' copies are no longer needed
            remove_tree(self.root.ranks_dir)
            return writer, RunState.from_journal(writer.resumed_state)
        for rank in range(self.ranks.world_size):
            writer.adopt(self.root.rank_staging(rank))
        states = tensor_parallel.group_leaders([RunState.from_journal(s) for s in shares], self.ranks)  # issue 19
        merged = RunState(
            fresh.run_key, fresh.identity, fresh.world_size, fresh.replace, phase="captured",
            next_index=max(s.next_index for s in states), documents=sum(s.documents for s in states),
            skipped=sum(s.skipped for s in states), tokens=sum(s.tokens for s in states),
            example_ids=[i for s in states for i in s.example_ids],
        )
        _require_tokens(merged)
        writer.commit(merged.to_journal())
        remove_tree(self.root.ranks_dir)
        return writer, merged

    # -- step 8: finish ------------------------------------------------------------
    def finish(self, sniffer: Sniffer, writer: DatasetWriter, state: RunState) -> None:
        """Final files, card and manifest into ``.qkcore/final``; recorded in the journal; parts freed."""
        final = self.root.final_dir
        remove_tree(final)  # leftovers of an interrupted finish are rewritten from the parts
        stats = writer.finalize(final)
        entry = sniffer.model_entry(state, stats)
        out = self.cfg.output
        card = render_card(entry, stats, hub_repo=out.hf_repo_id, hub_branch=out.hf_branch, license=getattr(out, "license", None))
        write_text_durably(final / CARD_FILE, card)
        manifest = Manifest(state.run_key, state.identity, stats, card_sha256=sha256_file(final / CARD_FILE),
                            documents=state.documents, tokens=state.tokens)
        write_text_durably(final / MANIFEST_FILE, manifest.to_json())
        files = {config_file(name): {"size": s.size, "sha256": s.sha256} for name, s in stats.items()}
        for name in (CARD_FILE, MANIFEST_FILE):
            entry_ = file_entry(final / name)
            files[name] = {"size": entry_.size, "sha256": entry_.sha256}
        state.files = files
        state.summary = {
            "model": entry.name, "created": entry.created, "documents": state.documents, "tokens": state.tokens,
            "skipped": state.skipped, "nonfinite_rows": entry.nonfinite_rows,
        }
        state.phase = "finalized"
        writer.commit(state.to_journal())
        writer.drop_parts()
        if entry.nonfinite_rows:
            log.warning("rows with NaN or infinity were written; the card and qkcore.json count them",
                        rows=entry.nonfinite_rows)

    # -- step 9: publish, push ----------------------------------------------------
    def publish(self, writer: DatasetWriter, state: RunState) -> Record:
        files = {name: FileEntry(f["size"], f["sha256"]) for name, f in state.files.items()}
        record = Record("publishing", state.run_key, state.identity, files, summary=state.summary, hub=self._hub_target(None))
        record = self.root.publish(record)
        writer.discard()
        log.info("capture written", data_root=self.root.location, configs=len(files) - 2,
                 documents=state.documents, tokens=state.tokens, seconds=round(time.perf_counter() - self.started, 2))
        if self.hub is not None:
            self.push(record)
        return record

    def push(self, record: Record) -> None:
        """Push the published files; the record notes the commit (a failure leaves it unpushed, files kept)."""
        assert self.hub is not None
        with self.root.local_copy() as folder:
            commit = self.hub.push(folder, sorted(record.files), f"qkcore: {record.summary.get('model')} (run {record.run_key})")
        record.hub = self._hub_target(commit)
        self.root.write_record(record)

    def _hub_target(self, commit: str | None) -> dict[str, Any] | None:
        if self.hub is None:
            return None
        return {"repo": self.hub.repo_id, "branch": self.hub.branch, "pushed_commit": commit}

    def _pushed_to_target(self, record: Record) -> bool:
        assert self.hub is not None
        hub = record.hub or {}
        return bool(hub.get("pushed_commit")) and (hub.get("repo"), hub.get("branch")) == (self.hub.repo_id, self.hub.branch)

    def _check_disk(self, sniffer: Sniffer) -> None:
        needed = sniffer.disk_needed_bytes()
        free = shutil.disk_usage(self.root.work_dir).free
        if needed > free:
            log.warning("the data root may not have enough free disk for this run (estimate for documents at "
                        "tokenizer.max_length; see `qkcore plan`)", needed_gb=round(needed / 1e9, 2), free_gb=round(free / 1e9, 2))

    def _result(self, record: Record, action: str) -> SniffResult:
        manifest = self.root.read_manifest()
        rows = {name: s.rows for name, s in manifest.configs.items()} if manifest else {}
        summary = record.summary
        return SniffResult(self.cfg.output.data_root, rows, int(summary.get("documents") or 0), int(summary.get("tokens") or 0), action)


def branch_view(hub: HubSync, state: Any) -> BranchView:
    """What the rule needs to know of a branch: its files (what a push would replace) and the run its card names.

    The Hub's ``.gitattributes``, and a ``README.md`` that is the main branch's (a branch is
    created from ``main``, so it starts with the README qkcore seeds there), are not content.
    """
    files = [f for f in state.files if f != GITATTRIBUTES]
    if state.card is not None and state.card == main_branch_readme(hub.repo_id):
        files = [f for f in files if f != CARD_FILE]
    return BranchView(hub.where, tuple(files), card_run_key(state.card), state.commit)


def run_push(cfg: SniffConfig, hub_api: Any = None, replace: bool = False) -> Record:
    """``qkcore push``: upload a data root's complete run to its Hub branch (e.g. after a failed push).

    Refuses a root whose record is missing, half-published, or does not match its files
    (every file is rehashed), and a branch that holds another run unless ``replace``.
    """
    from qkcore.root_policy import check_branch

    hub = hub_sync(cfg.output, api=hub_api)
    if hub is None:
        raise QkcoreError(f"{cfg.source or '<config>'}: output.hf_repo_id is not set; nothing to push to")
    root = open_output(cfg.output)
    if not root.has_state():
        raise QkcoreError(f"output.data_root: {root.location} holds no qkcore run; nothing to push")
    with root.locked(command_line()):
        record = root.read_record()
        if record is None:
            raise QkcoreError(f"output.data_root: {root.location} holds no finished qkcore run; nothing to push")
        if record.state != "complete":
            raise QkcoreError(
                f"{root.location} is half-way through publishing {record.describe()}: rerun `qkcore sniff --config "
                f"{cfg.source or 'FILE'}` to finish it, then push"
            )
        problems = root.verify(record, full=True)
        if problems:
            raise QkcoreError(
                f"{root.location}: the files do not match the record of {record.describe()} ({'; '.join(problems[:3])}); "
                "nothing was pushed: rerun the sniff to repair the data root"
            )
        check_branch(branch_view(hub, hub.preflight()), record.run_key, replace)
        with root.local_copy() as folder:
            commit = hub.push(folder, sorted(record.files), f"qkcore push: {record.summary.get('model')} (run {record.run_key})")
        record.hub = {"repo": hub.repo_id, "branch": hub.branch, "pushed_commit": commit}
        root.write_record(record)
        log.info("pushed", run=record.run_key, target=f"{hub.repo_id}@{hub.branch}", commit=commit)
        return record
