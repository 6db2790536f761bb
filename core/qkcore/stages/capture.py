"""Stage 2 of a run: capture a unit of documents into staged parts.

:class:`Sniffer` is a loaded model with its capture plan and capture session: it turns
batches of documents into kept rows. :func:`capture_unit` runs it over one unit of
documents (a whole run, or one torchrun rank's share) into a staging folder, committing
progress with the rows, and returns the writer and the committed :class:`RunState`
(phase ``captured``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pluggy
import structlog
import torch
from tqdm.auto import tqdm

from qkcore import tensor_parallel
from qkcore.autocast import autocast_dtype
from qkcore.background import BackgroundWriter
from qkcore.batching import Batch, tokenize_batches
from qkcore.capture import CaptureSession
from qkcore.config import SniffConfig
from qkcore.distributed import Ranks
from qkcore.errors import QkcoreError
from qkcore.layers import AttentionLayer
from qkcore.logs import progress_disable
from qkcore.plugins import installed_summary, make_plugin_manager
from qkcore.run_state import RunState
from qkcore.sources.documents import iter_documents
from qkcore.stages.load import RunInputs, load_inputs, load_weights
from qkcore.stages.plan import plan_capture
from qkcore.writer import CapturedChunk, DatasetWriter, StagingConflict

log = structlog.get_logger(__name__)

#: Called after each commit of a capture with the committed state (JSON) and the documents this
#: unit captures in all (``None`` when unknown): a sweep shard uploads its staging and reports progress.
CommitHook = Callable[[dict[str, Any], "int | None"], None]


class Sniffer:
    """A loaded run: its inputs plus the model, the plugin's capture plan and the capture session.

    :meth:`instrumented` and :meth:`capture_batch` expose the forward-with-capture step
    alone (the benchmark uses them); :meth:`capture_documents` runs documents into a writer.
    """

    def __init__(self, inputs: RunInputs, model: torch.nn.Module, ranks: Ranks | None = None) -> None:
        self.inputs = inputs
        self.cfg = cfg = inputs.cfg
        self.ranks = ranks or Ranks()
        self.sampler, self.device, self.data, self.tokenizer = inputs.sampler, inputs.device, inputs.data, inputs.tokenizer
        self.family = inputs.family
        self.model = model
        self.plan = plan_capture(self.model, self.family, cfg, installed_summary(inputs.pm))
        self.backbone = self.family.hooks.qkcore_backbone(model=self.model)
        self.model_name = cfg.model.name or f"random-{self.family.model_type}"
        # issue 19: the card describes the whole plan; this rank captures the heads it holds.
        captured = (
            tensor_parallel.shard_plan(self.plan, self.family, self.ranks)
            if self.ranks.tensor_parallel_size > 1 else self.plan
        )
        self.session = CaptureSession(
            captured, self.sampler, postprocess_query=self._postprocess,
            max_rows=cfg.capture.max_rows_per_batch,
            token_strings=self.tokenizer.convert_ids_to_tokens if cfg.capture.capture_token_strings else None,
        )
        self.model_dtype = next(self.model.parameters()).dtype
        self.autocast_dtype = autocast_dtype(cfg.inference.autocast_dtype, self.device.type, self.model_dtype)
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
        inputs = load_inputs(cfg, pm or make_plugin_manager())
        return cls(inputs, load_weights(inputs))

    @property
    def vector_dtype(self) -> str:
        """The dtype the captured vectors are computed in (autocast's where it applies), for the disk estimate."""
        return str(self.autocast_dtype or self.model_dtype).removeprefix("torch.")

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
        if self.autocast_dtype is not None:
            with torch.autocast(device_type="cuda", dtype=self.autocast_dtype):
                self.backbone(input_ids=input_ids, use_cache=False)
        else:
            self.backbone(input_ids=input_ids, use_cache=False)
        return self.session.end_batch()

    def capture_documents(
        self, writer: DatasetWriter, progress: CaptureProgress, start: int | None = None,
        on_commit: CommitHook | None = None,
    ) -> None:
        """Capture this rank's documents from ``progress.next_index`` on, committing progress as it goes.

        ``start`` (tensor parallelism, issue 19): run the forwards from there, writing only the
        batches from ``progress.next_index`` on (the group's ranks run every forward together).
        ``on_commit``: see :data:`CommitHook` (runs on the writer thread, after the commit).

        ``progress`` is updated batch by batch (after an error it says how far the capture
        got); the caller commits the last of it with its phase. On a terminal one progress
        line shows documents, tokens/s and the time left; without one (a log file,
        ``--quiet``, ``--json-logs``) each commit logs a progress line instead. A line per
        batch is logged at debug level.
        """
        total = self.inputs.documents.documents
        batch_size = self.cfg.inference.batch_size
        share = None if total is None else sum(1 for i in range(total) if self.ranks.owns(i, batch_size))
        bar = tqdm(
            total=share, initial=progress.documents + progress.skipped, unit="doc", dynamic_ncols=True,
            desc=f"sniff[{self.ranks.rank}]" if self.ranks.distributed else "sniff", disable=progress_disable(),
        )
        started, tokens_before, last_commit = time.perf_counter(), progress.tokens, time.monotonic()
        # Rows are handed to a writer thread: spills and commits overlap the next forward.
        after = None if on_commit is None else (lambda state: on_commit(state, share))
        background = BackgroundWriter(writer, int(self.cfg.output.flush_threshold_mb * 2**20), after)
        debug_every = self.cfg.inference.debug_log_every_n_batches or 1
        warned: set[str] = set()
        try:
            with self.instrumented():
                first = progress.next_index if start is None else min(start, progress.next_index)
                for count, (batch, selections) in enumerate(self.prepared_batches(start=first), 1):
                    if batch.next_index <= progress.next_index:  # issue 19: written already; the group needs the forward
                        if batch.lengths:
                            self.capture_batch(batch, selections)
                        continue
                    if batch.lengths:  # a batch of empty texts has nothing to run
                        for chunk in self.capture_batch(batch, selections):
                            _warn_nonfinite(chunk, warned)
                            background.add(chunk)
                    progress.add(batch)
                    committed = time.monotonic() - last_commit >= self.cfg.output.commit_every_s
                    if committed:
                        background.commit(progress.state().to_json())
                        last_commit = time.monotonic()
                    bar.update(len(batch.lengths) + batch.skipped)
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    rate = (progress.tokens - tokens_before) / elapsed
                    bar.set_postfix(tok_s=f"{rate:,.0f}", refresh=False)
                    if count % debug_every == 0:
                        log.debug("batch captured", batch_documents=len(batch.lengths), batch_tokens=batch.tokens,
                                  documents=progress.documents, tokens=progress.tokens, next_index=progress.next_index)
                    if committed and bar.disable:  # no live line: say how far the run is at each commit
                        log.info("progress", documents=progress.documents, of=share, tokens=progress.tokens,
                                 tok_s=round(rate), elapsed_s=round(elapsed, 1))
            background.drain()
        finally:
            background.stop()
            bar.close()
        if progress.skipped:
            log.warning("documents without tokens (empty texts) were skipped", skipped=progress.skipped)


class CaptureProgress:
    """The counters a capture advances batch by batch; :meth:`state` is the :class:`RunState` to commit."""

    def __init__(self, start: RunState) -> None:
        self._start = start
        self.documents, self.skipped, self.tokens = start.documents, start.skipped, start.tokens
        self.next_index = start.next_index
        self.example_ids = list(start.example_ids)

    def add(self, batch: Batch) -> None:
        self.documents += len(batch.lengths)
        self.skipped += batch.skipped
        self.tokens += batch.tokens
        self.example_ids.extend(batch.example_ids)
        self.next_index = batch.next_index

    def state(self) -> RunState:
        return replace(self._start, documents=self.documents, skipped=self.skipped, tokens=self.tokens,
                       next_index=self.next_index, example_ids=tuple(self.example_ids))


def open_writer(cfg: SniffConfig, staging: Path, run_key: str) -> DatasetWriter:
    """The run's writer on ``staging`` (resuming its committed parts if the journal names ``run_key``)."""
    try:
        return DatasetWriter(
            staging, flush_threshold_mb=cfg.output.flush_threshold_mb,
            row_group_size=cfg.output.write_batch_size, run_key=run_key,
            token_strings=cfg.capture.capture_token_strings,
        )
    except StagingConflict as exc:  # the rule checked the staged key: this is a damaged staging
        raise QkcoreError(f"{exc}; rerun with --restart to discard it") from None


def resumed_state(writer: DatasetWriter) -> RunState | None:
    """The :class:`RunState` the writer resumed from, ``None`` for a fresh staging."""
    if writer.resumed_state is None:
        return None
    try:
        return RunState.from_json(writer.resumed_state)
    except ValueError as exc:
        raise QkcoreError(f"{writer.staging_dir}: the journal's state is unreadable ({exc}); "
                          "rerun with --restart to discard the staged progress") from None


def capture_unit(
    sniffer: Sniffer, staging: Path, fresh: RunState, *, whole_run: bool, on_commit: CommitHook | None = None
) -> tuple[DatasetWriter, RunState]:
    """Capture (or resume capturing) into ``staging`` until every document is done; commit that.

    ``whole_run``: this process captures the whole run (not one torchrun rank's share,
    which may hold no document), so a run without a single token is refused here.
    ``on_commit`` runs after every commit, the last (phase ``captured``) included.
    """
    writer = open_writer(sniffer.cfg, staging, fresh.run_key)
    state = resumed_state(writer) or fresh
    if writer.resumed_state is not None:
        log.info("resuming", documents_done=state.documents, next_index=state.next_index, phase=state.phase)
    # issue 19: a tensor-parallel group resumes together (a collective; the run itself without TP)
    start = tensor_parallel.group_start(sniffer.ranks, state.phase == "capturing", state.next_index)
    if start is None:
        return writer, state
    progress = CaptureProgress(state)
    try:
        sniffer.capture_documents(writer, progress, start, on_commit)
        state = progress.state()
        if whole_run:
            require_tokens(state)
        state = replace(state, phase="captured")
        writer.commit(state.to_json())
        if on_commit is not None:
            on_commit(state.to_json(), state.documents + state.skipped)
    except BaseException:
        # Nothing captured at all (every text empty): leave nothing behind; else keep the last commit.
        writer.discard() if progress.documents == 0 and whole_run else writer.abort()
        raise
    return writer, state


def require_tokens(state: RunState) -> None:
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
