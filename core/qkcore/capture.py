"""Capturing sampled Q/K rows during the forward pass.

The session sees each attention call (post-RoPE through the attention
interface, or pre-RoPE through forward hooks at the RoPE site), gathers only
the kept (example, position) rows of the selected heads on the device, and
moves them to the host once per forward. Which rows are kept is decided before
the forward by the sampler (see :func:`qkcore.samplers.keep_indices`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from qkcore.errors import QkcoreError
from qkcore.layers import AttentionLayer, RopeSite
from qkcore.samplers import Sampler, cap_rows, keep_indices
from qkcore.writer import CapturedChunk


@dataclass
class CapturePlan:
    """What to capture: layers, heads per layer and kind, and the RoPE stage."""

    layers: dict[int, AttentionLayer]
    heads: dict[tuple[int, str], list[int]]  # (layer index, "q"|"k") -> head indices
    pre_rope: bool = False
    rope_sites: dict[int, RopeSite] = field(default_factory=dict)
    #: layer -> {query head: key head} for every selected query head (the family's GQA mapping).
    key_head_of: dict[int, dict[int, int]] = field(default_factory=dict)
    #: ``capture.unscaled_queries``: post-RoPE query rows go through the family's
    #: ``qkcore_postprocess_query`` (undoing its post-RoPE scaling); else they are the kernel's query.
    unscaled_queries: bool = False
    #: One line saying how the query heads were chosen (:meth:`qkcore.heads.HeadSelection.describe`).
    head_selection: str = ""
    #: Set when the original sniff-qk would pick other heads for this config: how to reproduce its heads.
    head_selection_note: str | None = None
    #: issue 19 (tensor parallelism, :func:`qkcore.tensor_parallel.shard_plan`): per (layer, kind), where each
    #: captured head sits in the tensor the kernel receives on this rank (default: at its own index) ...
    tensor_heads: dict[tuple[int, str], list[int]] = field(default_factory=dict)
    #: ... and the head that seeds the per-document row cap (default: the first captured head): the
    #: one-process plan's, so every rank draws the masks one device draws.
    cap_head: dict[tuple[int, str], int] = field(default_factory=dict)
    #: Every attention layer of the model (the family's ``qkcore_attention_layers``, asked once), captured or not.
    all_layers: list[AttentionLayer] = field(default_factory=list)
    #: Layers that pass the filters and may be captured (not cross-attention), whether or not a head was picked.
    eligible_layers: tuple[int, ...] = ()


@dataclass
class _Selection:
    """Rows kept for one (layer, kind) in the current batch."""

    batch_index: torch.Tensor  # (n,) int64, CPU
    positions: torch.Tensor  # (n,) int64, CPU
    buckets: np.ndarray
    example_ids: np.ndarray
    tokens: np.ndarray | None = None  # object (str), (n,): the token at each kept position
    on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def to_device(self, device: torch.device, heads: torch.Tensor) -> None:
        """Start the pinned, non-blocking copy of the indices to ``device``."""
        self.on_device[device] = tuple(  # type: ignore[assignment]
            t.pin_memory().to(device, non_blocking=True) for t in (self.batch_index, self.positions, heads)
        )

    def indices(self, device: torch.device, heads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if device not in self.on_device:
            self.on_device[device] = (
                self.batch_index.to(device, non_blocking=True),
                self.positions.to(device, non_blocking=True),
                heads.to(device, non_blocking=True),
            )
        return self.on_device[device]


class CaptureSession:
    """Receives Q/K tensors from the instrumented model and returns kept rows per batch."""

    def __init__(
        self,
        plan: CapturePlan,
        sampler: Sampler,
        postprocess_query: Callable[..., Any] | None = None,
        *,
        max_rows: int | None = None,
        token_strings: Callable[[list[int]], list[str]] | None = None,
    ) -> None:
        """``max_rows``: ``capture.max_rows_per_batch`` (rows kept per document, layer and kind);
        ``token_strings``: the tokenizer's ``convert_ids_to_tokens``, to record each row's token."""
        self.plan = plan
        self.sampler = sampler
        self.postprocess_query = postprocess_query
        self.max_rows = max_rows
        self.token_strings = token_strings
        self._layer_by_module = {id(layer.module): layer for layer in plan.layers.values()}
        self._head_tensors = {
            key: torch.tensor(plan.tensor_heads.get(key, heads), dtype=torch.long) for key, heads in plan.heads.items()
        }
        self._selections: dict[tuple[int, str], _Selection] = {}
        self._pending: dict[tuple[int, str], torch.Tensor] = {}
        self._active = False
        self._seq_len = 0

    # -- per batch -----------------------------------------------------
    def select(
        self, example_ids: list[int], lengths: list[int], input_ids: torch.Tensor | None = None
    ) -> dict[tuple[int, str], _Selection]:
        """Decide which positions each (layer, kind) keeps for a batch (CPU only, thread-safe).

        ``input_ids`` is needed only to record token strings.
        """
        tokens_of: list[np.ndarray] = []
        if self.token_strings is not None:
            if input_ids is None:
                raise ValueError("recording token strings needs the batch's input_ids")
            tokens_of = [
                np.asarray(self.token_strings(input_ids[b, :length].tolist()), dtype=object)
                for b, length in enumerate(lengths)
            ]
        selections = {}
        for (layer, kind), heads in self.plan.heads.items():
            batch_parts, pos_parts, id_parts, token_parts = [], [], [], []
            for b, (example_id, length) in enumerate(zip(example_ids, lengths)):
                kept = keep_indices(self.sampler, length, example_id, layer, kind)
                kept = cap_rows(kept, self.max_rows, example_id, layer, kind, self.plan.cap_head.get((layer, kind), heads[0]))
                batch_parts.append(torch.full_like(kept, b))
                pos_parts.append(kept)
                id_parts.append(np.full(kept.numel(), example_id, dtype=np.int64))
                if tokens_of:
                    token_parts.append(tokens_of[b][kept.numpy()])
            positions = torch.cat(pos_parts) if pos_parts else torch.empty(0, dtype=torch.long)
            selections[(layer, kind)] = _Selection(
                batch_index=torch.cat(batch_parts) if batch_parts else torch.empty(0, dtype=torch.long),
                positions=positions,
                buckets=self.sampler.buckets(positions).numpy().astype(np.int64),
                example_ids=np.concatenate(id_parts) if id_parts else np.empty(0, dtype=np.int64),
                tokens=(np.concatenate(token_parts) if token_parts else np.empty(0, object))
                if self.token_strings is not None else None,
            )
        return selections

    def begin_batch(
        self,
        example_ids: list[int],
        lengths: list[int],
        selections: dict[tuple[int, str], _Selection] | None = None,
        device: torch.device | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> None:
        """Arm the capture for the next forward with the kept positions (from :meth:`select`).

        With ``device`` (an accelerator), the indices are copied there now, from
        pinned memory and without blocking, so nothing inside the forward waits on
        a host-to-device copy. Modules on other devices get theirs on first use.
        """
        self._selections = selections if selections is not None else self.select(example_ids, lengths, input_ids)
        if device is not None and device.type == "cuda":
            for key, selection in self._selections.items():
                selection.to_device(device, self._head_tensors[key])
        self._pending.clear()
        self._seq_len = max(lengths, default=0)  # batches are right-padded to the longest
        self._active = True

    def end_batch(self) -> list[CapturedChunk]:
        """Move this batch's rows to the host (one synchronisation) and return them."""
        self._active = False
        missing = sorted(set(self.plan.heads) - set(self._pending))
        if missing:
            layer, kind = missing[0]
            raise QkcoreError(
                f"layer {layer} ({kind}) was never seen by the capture during the forward pass: "
                "its attention does not go through the instrumented path; the model's plugin must instrument it"
            )
        host: dict[tuple[int, str], torch.Tensor] = {}
        for key, rows in self._pending.items():
            pinned = rows.is_cuda
            buffer = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=pinned)
            buffer.copy_(rows, non_blocking=pinned)
            host[key] = buffer
        if any(rows.is_cuda for rows in self._pending.values()):
            torch.cuda.synchronize()
        chunks = []
        for (layer, kind), rows in sorted(host.items()):
            selection = self._selections[(layer, kind)]
            chunks.append(
                CapturedChunk(
                    layer=layer,
                    kind=kind,
                    heads=list(self.plan.heads[(layer, kind)]),
                    example_ids=selection.example_ids,
                    positions=selection.positions.numpy().astype(np.int64),
                    buckets=selection.buckets,
                    vectors=rows.to(torch.float32).numpy(),
                    sliding_window=self.plan.layers[layer].sliding_window,
                    token_strings=selection.tokens,
                )
            )
        self._pending.clear()
        return chunks

    # -- called from inside the forward -----------------------------------
    def on_qk(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> None:
        """Attention-interface callback: ``query``/``key`` are ``(batch, heads, seq, dim)``."""
        layer = self._layer_by_module.get(id(module))
        if layer is None or not self._active:
            return
        for kind, tensor in (("q", query), ("k", key)):
            if (layer.index, kind) in self.plan.heads:
                self._capture(layer, kind, tensor)

    def _capture(self, layer: AttentionLayer, kind: str, tensor: torch.Tensor) -> None:
        key = (layer.index, kind)
        if key in self._pending:
            raise QkcoreError(f"layer {layer.index} ({kind}) was captured twice in one forward pass")
        selection = self._selections[key]
        batch_index, positions, heads = selection.indices(tensor.device, self._head_tensors[key])
        # Advanced indexing gathers only the kept rows: (n, heads, dim), no full-tensor copy.
        rows = tensor.detach()[batch_index[:, None], heads[None, :], positions[:, None]].permute(1, 0, 2)
        # The post-processing undoes what a family does to the query *after* RoPE: only on
        # request (capture.unscaled_queries; by default rows are what the kernel receives,
        # as in the original tool's datasets) and never on pre-RoPE rows.
        if kind == "q" and self.plan.unscaled_queries and self.postprocess_query is not None and not self.plan.pre_rope:
            rows = self.postprocess_query(layer=layer, query=rows, positions=positions)
        self._pending[key] = rows

    def _on_pre_rope(self, layer: AttentionLayer, kind: str, output: torch.Tensor, heads_first: bool) -> None:
        if not self._active:
            return
        seq_axis = 2 if heads_first else 1
        if output.dim() == 4 and output.shape[seq_axis] != self._seq_len:
            # A (batch, heads, seq, dim) tensor would .view() as sequence-first without error
            # and scramble the rows: refuse instead.
            raise QkcoreError(
                f"layer {layer.index} ({kind}): the pre-RoPE source outputs shape {tuple(output.shape)}, but the "
                f"plugin declared {'heads' if heads_first else 'sequence'}-first layout (sequence length "
                f"{self._seq_len}); fix RopeSite.heads_first in the model's plugin"
            )
        if heads_first:  # already (batch, heads, seq, dim)
            self._capture(layer, kind, output)
            return
        num_heads = layer.num_query_heads if kind == "q" else layer.num_key_value_heads
        batch, seq = output.shape[0], output.shape[1]
        # (batch, seq, heads*dim) or (batch, seq, heads, dim) -> (batch, heads, seq, dim), a view.
        tensor = output.view(batch, seq, num_heads, layer.head_dim).transpose(1, 2)
        self._capture(layer, kind, tensor)

    # -- wiring -----------------------------------------------------------
    @contextmanager
    def attached(self, model: nn.Module, instrument: Callable[..., Any]) -> Iterator["CaptureSession"]:
        """Instrument ``model`` for this session; restore it on exit."""
        handles: list[Any] = []
        try:
            if self.plan.pre_rope:
                for index, layer in self.plan.layers.items():
                    site = self.plan.rope_sites[index]
                    for kind, source in (("q", site.query_source), ("k", site.key_source)):
                        if (index, kind) in self.plan.heads:
                            handles.append(source.register_forward_hook(self._pre_rope_hook(layer, kind, site.heads_first)))
            else:
                handles.append(instrument(model=model, layers=list(self.plan.layers.values()), on_qk=self.on_qk))
            yield self
        finally:
            for handle in reversed(handles):
                handle.remove()

    def _pre_rope_hook(self, layer: AttentionLayer, kind: str, heads_first: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self._on_pre_rope(layer, kind, output, heads_first)

        return hook
