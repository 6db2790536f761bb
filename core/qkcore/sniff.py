"""One capture run: config → model/plugin → capture → sampler → writer → card.

Everything that can be checked is checked before the first file is written,
so a bad config, column or model fails with one message and writes nothing.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pluggy
import structlog
import torch
from tqdm.auto import tqdm

from qkcore import __version__
from qkcore.background import BackgroundWriter
from qkcore.batching import Batch, tokenize_batches
from qkcore.capture import CaptureSession
from qkcore.card import ModelEntry, write_card
from qkcore.config import ConfigError, SniffConfig, config_to_dict, resolve_dtype
from qkcore.errors import QkcoreError
from qkcore.example_ids import find_int32_collisions
from qkcore.distributed import Ranks, init_ranks, shutdown
from qkcore.hub import PENDING_MARKER, dataset_files, hub_sync, is_dataset_file
from qkcore.runs import completed_run, record_completion, run_key
from qkcore.layers import AttentionLayer
from qkcore.planning import build_sampler, plan_capture
from qkcore.plugins import installed_summary, make_plugin_manager, resolve_family
from qkcore.sources.documents import check_columns, document_count, iter_documents, open_dataset
from qkcore.sources.model import load_architecture, load_model, resolve_device
from qkcore.sources.tokenizer import load_tokenizer
from qkcore.writer import CapturedChunk, DatasetWriter, StagingConflict, staged_state

log = structlog.get_logger(__name__)

#: Where torchrun ranks stage their parts until rank 0 merges them.
RANKS_DIR = ".qkcore-ranks"

EXAMPLE_ID_RULE = (
    "integers in the int64 range (and integral floats) are kept; anything else becomes "
    "blake2b(str(v).encode('utf-8'), digest_size=8) read little-endian as a signed int64. "
    "The 64-bit id seeds the sampler; the example_id column holds its low 32 bits as a signed int32."
)


@dataclass
class SniffResult:
    """What a run wrote."""

    data_root: Path
    rows: dict[str, int]
    documents: int
    tokens: int


class Sniffer:
    """A loaded run: sampler, documents, tokenizer, model, plugin and capture plan.

    Constructing it checks and loads everything and writes nothing; :meth:`run`
    captures and writes. :meth:`instrumented` and :meth:`capture_batch` expose the
    forward-with-capture step alone (used by the benchmark).
    """

    def __init__(
        self, cfg: SniffConfig, pm: pluggy.PluginManager | None = None, hub_api: Any = None, ranks: Ranks | None = None
    ) -> None:
        self.cfg = cfg
        self.hub = hub_sync(cfg.output, api=hub_api)
        self.ranks = ranks or Ranks()
        # Token, access and the branch's state, checked before anything slow is loaded.
        self.hub_state = self.hub.preflight() if self.hub is not None and self.ranks.is_main else None
        pm = pm or make_plugin_manager()
        self.sampler = build_sampler(pm, cfg)
        self.device = self.ranks.device(resolve_device(cfg.model.device_map))
        self.data = open_dataset(cfg.dataset)
        check_columns(self.data, cfg.dataset)
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
        config = load_architecture(cfg.model)
        self.family = resolve_family(pm, config.model_type)
        model_class = self.family.hooks.qkcore_model_class(config=config)
        self.model = load_model(cfg.model, config, model_class, resolve_dtype(cfg.model.dtype), self.device)
        self.plan = plan_capture(self.model, self.family, cfg, installed_summary(pm))
        self.backbone = self.family.hooks.qkcore_backbone(model=self.model)
        self.model_name = cfg.model.name or f"random-{self.family.model_type}"
        self.session = CaptureSession(self.plan, self.sampler, postprocess_query=self._postprocess)
        # Autocast only where it changes something: a bf16 model under bf16 autocast would
        # only add casts (and cached weight copies) to the forward.
        autocast_dtype = resolve_dtype(cfg.inference.autocast_dtype)
        model_dtype = next(self.model.parameters()).dtype
        self._autocast_dtype = (
            autocast_dtype if self.device.type == "cuda" and autocast_dtype not in ("auto", model_dtype) else None
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

    def _postprocess(self, layer: AttentionLayer, query: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        result = self.family.hooks.qkcore_postprocess_query(layer=layer, query=query, positions=positions)
        return query if result is None else result

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Tokenised, right-padded batches of this rank's documents from dataset index ``start`` on."""
        documents = (
            doc for doc in iter_documents(self.data, self.cfg.dataset)
            if doc.index >= start and self.ranks.owns(doc.index)
        )
        return tokenize_batches(
            documents,
            self.tokenizer,
            max_length=self.cfg.tokenizer.max_length,
            batch_size=self.cfg.inference.batch_size,
        )

    @contextmanager
    def instrumented(self) -> Iterator["Sniffer"]:
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
            return None if batch is None else (batch, self.session.select(batch.example_ids, batch.lengths))

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qkcore-prefetch") as pool:
            upcoming = pool.submit(prepare)
            while (item := upcoming.result()) is not None:
                upcoming = pool.submit(prepare)
                yield item

    def capture_batch(self, batch: Batch, selections: Any = None) -> list[CapturedChunk]:
        """Run the backbone on ``batch`` (inside :meth:`instrumented`) and return its kept rows."""
        self.session.begin_batch(batch.example_ids, batch.lengths, selections, device=self.device)
        input_ids = batch.input_ids.to(self.device, non_blocking=True)
        if self._autocast_dtype is not None:
            with torch.autocast(device_type="cuda", dtype=self._autocast_dtype):
                self.backbone(input_ids=input_ids, use_cache=False)
        else:
            self.backbone(input_ids=input_ids, use_cache=False)
        return self.session.end_batch()

    def run(self, restart: bool = False) -> SniffResult:
        """Capture every document (this rank's share), write the configs, the card, push.

        Progress is committed to the staging journal after each batch (at most every
        ``output.commit_every_s``); the same command after a crash resumes there.
        Under torchrun each rank stages its own part and rank 0 merges them.
        """
        cfg, ranks = self.cfg, self.ranks
        data_root = Path(cfg.output.data_root)
        key = run_key(cfg, ranks.world_size)
        stage_root = data_root / RANKS_DIR / f"rank-{ranks.rank:03d}" if ranks.distributed else data_root
        merged = ranks.distributed and staged_state(data_root, key) is not None  # crashed during the merge
        try:
            writer = DatasetWriter(
                stage_root,
                flush_threshold_mb=cfg.output.flush_threshold_mb,
                row_group_size=cfg.output.write_batch_size,
                run_key=f"{key}-rank{ranks.rank}" if ranks.distributed else key,
                restart=restart,
            )
        except StagingConflict as exc:
            raise QkcoreError(f"{exc}; or run `qkcore sniff --restart` to discard it") from exc
        state = writer.resumed_state or {"next_index": 0, "documents": 0, "tokens": 0, "example_ids": []}
        if ranks.is_main and self.hub is not None and writer.resumed_state is None and not merged:
            self._start_from_branch(data_root)
        if writer.resumed_state is not None:
            log.info("resuming", documents_done=state["documents"], next_index=state["next_index"])
        started = time.perf_counter()
        try:
            if not merged and not state.get("finished"):
                self._capture_all(writer, state, started)
            if ranks.distributed:
                writer.commit(state)
                shares = ranks.gather(state)
                ranks.barrier()
                if not ranks.is_main:
                    return SniffResult(data_root, {}, state["documents"], state["tokens"])
                writer, state = self._merge_ranks(data_root, key, shares, restart)
            rows = writer.close()
        except BaseException:
            writer.abort()
            raise
        if ranks.distributed:
            shutil.rmtree(data_root / RANKS_DIR, ignore_errors=True)
        return self._finish(data_root, key, rows, state, started)

    def _start_from_branch(self, data_root: Path) -> None:
        """Download the branch's dataset files into a root that holds none; mark the root unpushed."""
        marker = data_root / PENDING_MARKER
        if marker.exists():
            raise QkcoreError(
                f"{data_root} holds captured data that was never pushed to {self.hub.where} "
                f"({marker}); run `qkcore push --config FILE` first, or delete the marker to discard it"
            )
        if not dataset_files(data_root):
            published = [f for f in self.hub_state.files if is_dataset_file(f)]
            self.hub.download(self.hub_state, published, data_root)
        data_root.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{self.hub.where}\n", encoding="utf-8")  # local data now differs from the branch

    def _capture_all(self, writer: DatasetWriter, state: dict[str, Any], started: float) -> None:
        """Capture this rank's documents from ``state['next_index']`` on, committing as it goes."""
        total = document_count(self.data, self.cfg.dataset)
        share = None if total is None else len(range(self.ranks.rank, total, self.ranks.world_size))
        progress = tqdm(
            total=share, initial=state["documents"], desc=f"sniff[{self.ranks.rank}]" if self.ranks.distributed else "sniff",
            unit="doc", dynamic_ncols=True,
        )
        tokens_before, last_commit = state["tokens"], time.monotonic()
        # Rows are handed to a writer thread: spills and commits overlap the next forward.
        background = BackgroundWriter(writer, max_pending_bytes=int(self.cfg.output.flush_threshold_mb * 2**20))
        log_every = self.cfg.inference.debug_log_every_n_batches or 1
        try:
            with self.instrumented():
                for count, (batch, selections) in enumerate(self.prepared_batches(start=state["next_index"]), 1):
                    for chunk in self.capture_batch(batch, selections):
                        background.add(chunk)
                    state["documents"] += len(batch.lengths)
                    state["tokens"] += batch.tokens
                    state["example_ids"].extend(batch.example_ids)
                    state["next_index"] = batch.next_index
                    committed = time.monotonic() - last_commit >= self.cfg.output.commit_every_s
                    if committed:
                        background.commit(state)
                        last_commit = time.monotonic()
                    progress.update(len(batch.lengths))
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    rate = (state["tokens"] - tokens_before) / elapsed
                    progress.set_postfix(tok_s=f"{rate:,.0f}", refresh=False)
                    if committed or count % log_every == 0:
                        log.info("batch captured", documents=state["documents"], next_index=state["next_index"],
                                 tokens=batch.tokens, tok_s=round(rate), elapsed_s=round(elapsed, 1),
                                 committed=committed)
            background.drain()
        finally:
            background.stop()
            progress.close()
        state["finished"] = True

    def _merge_ranks(
        self, data_root: Path, key: str, shares: list[dict[str, Any]], restart: bool
    ) -> tuple[DatasetWriter, dict[str, Any]]:
        """Rank 0: adopt every rank's committed parts into one writer over ``data_root``.

        The merge is committed before anything else happens, so a crash after it
        resumes at the merge (``staged_state``) instead of recapturing.
        """
        writer = DatasetWriter(
            data_root, flush_threshold_mb=self.cfg.output.flush_threshold_mb,
            row_group_size=self.cfg.output.write_batch_size, run_key=key, restart=restart,
        )
        if writer.resumed_state is not None:
            return writer, writer.resumed_state
        for rank in range(self.ranks.world_size):
            writer.adopt(data_root / RANKS_DIR / f"rank-{rank:03d}")
        merged = {
            "documents": sum(s["documents"] for s in shares),
            "tokens": sum(s["tokens"] for s in shares),
            "example_ids": [i for s in shares for i in s["example_ids"]],
            "finished": True,
        }
        writer.commit(merged)
        return writer, merged

    def _finish(self, data_root: Path, key: str, rows: dict[str, int], state: dict[str, Any], started: float) -> SniffResult:
        """Card, completion record, push: the steps after the final files exist."""
        cfg = self.cfg
        collisions = find_int32_collisions(set(state["example_ids"]))
        if collisions:
            log.warning("example ids collide in the int32 column", collisions=dict(list(collisions.items())[:5]))
        entry = _model_entry(self, state["documents"], state["tokens"], collisions)
        write_card(data_root, cfg.output.readme_file, entry, hub_repo=cfg.output.hf_repo_id, hub_branch=cfg.output.hf_branch)
        record_completion(data_root, key, rows, {"documents": state["documents"], "tokens": state["tokens"]})
        log.info("capture written", data_root=str(data_root), configs=len(rows), rows=sum(rows.values()),
                 documents=state["documents"], tokens=state["tokens"], seconds=round(time.perf_counter() - started, 2))
        if self.hub is not None:
            self.hub.push(data_root, dataset_files(data_root), f"qkcore: {self.model_name} ({len(rows)} configs)")
            (data_root / PENDING_MARKER).unlink(missing_ok=True)
        return SniffResult(data_root, rows, state["documents"], state["tokens"])


def run_sniff(
    cfg: SniffConfig, pm: pluggy.PluginManager | None = None, hub_api: Any = None, restart: bool = False
) -> SniffResult:
    """Run one capture described by ``cfg``, write the dataset and its card, push if configured.

    A run whose completion record matches the files on disk does nothing (and says
    so); under torchrun every rank calls this and rank 0 merges.
    """
    ranks = init_ranks()
    structlog.contextvars.bind_contextvars(rank=ranks.rank)
    try:
        data_root = Path(cfg.output.data_root)
        done = None if restart else completed_run(data_root, run_key(cfg, ranks.world_size))
        if done is not None:
            log.info("already complete: the files of this run are unchanged; nothing to do", data_root=str(data_root))
            if (data_root / PENDING_MARKER).exists():
                log.warning("this data root was never pushed; run `qkcore push --config FILE`")
            return SniffResult(data_root, dict(done["rows"]), done["documents"], done["tokens"])
        return Sniffer(cfg, pm, hub_api=hub_api, ranks=ranks).run(restart=restart)
    finally:
        shutdown(ranks)


def _model_entry(run: Sniffer, documents: int, tokens: int, collisions: dict[int, list[int]]) -> ModelEntry:
    cfg, model, family, plan, sampler = run.cfg, run.model, run.family, run.plan, run.sampler
    layers: list[AttentionLayer] = family.hooks.qkcore_attention_layers(model=model)
    any_layer = layers[0]
    notes: list[str] = []
    for provided in family.hooks.qkcore_card_notes(model=model, layers=layers):
        notes.extend(provided or [])
    if family.is_fallback:
        notes.append(f"No plugin handles model_type '{family.model_type}': captured by the generic fallback.")
    if collisions:
        notes.append(f"{len(collisions)} int32 example_id value(s) are shared by distinct documents.")
    notes.append(
        "Captured " + ("pre-RoPE (after the per-head norm where the family has one)." if plan.pre_rope
                       else "post-RoPE: the query/key the attention kernel receives, before repeat_kv.")
    )
    settings = config_to_dict(cfg)
    return ModelEntry(
        name=run.model_name,
        revision=cfg.model.revision,
        model_type=family.model_type,
        plugin=f"{family.plugin_name} {family.plugin_version}",
        num_layers=len(layers),
        num_query_heads=any_layer.num_query_heads,
        num_key_value_heads=any_layer.num_key_value_heads,
        head_dim=any_layer.head_dim,
        source_dataset=settings["dataset"],
        sampler=sampler.describe(),
        capture={
            key: settings["capture"].get(key)
            for key in ("capture_pre_rope", "full_attention_only", "layers", "heads", "head_sampling",
                        "capture_queries", "capture_keys")
        },
        selected_heads={layer: heads for (layer, kind), heads in sorted(plan.heads.items()) if kind == "q"},
        key_heads={layer: heads for (layer, kind), heads in sorted(plan.heads.items()) if kind == "k"},
        key_head_of_query={layer: dict(sorted(mapping.items())) for layer, mapping in sorted(plan.key_head_of.items())},
        layer_kinds={layer.index: layer.kind for layer in layers},
        sliding_windows={layer.index: layer.sliding_window for layer in layers},
        rope_layers={index: site.applies_rope for index, site in sorted(plan.rope_sites.items())},
        notes=notes,
        example_id_rule=EXAMPLE_ID_RULE,
        documents=documents,
        tokens=tokens,
        qkcore_version=__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
