"""Tokenising documents into right-padded batches.

Right padding with a causal mask means no real token ever attends to a pad,
so the forward needs no attention mask (no O(n²) mask is built) and a token's
position is its index in its own sequence, whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from qkcore.sources.documents import Document


@dataclass
class Batch:
    """Token ids of several documents, right-padded to the longest."""

    example_ids: list[int]
    lengths: list[int]
    input_ids: torch.Tensor  # (batch, longest)
    next_index: int = 0  # dataset index after the last document of this batch (resume cursor)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def tokenize_batches(
    documents: Iterable[Document], tokenizer: Any, *, max_length: int, batch_size: int
) -> Iterator[Batch]:
    """Group documents ``batch_size`` at a time; documents with no tokens are skipped."""
    group: list[Document] = []
    for document in documents:
        group.append(document)
        if len(group) == batch_size:
            batch = _encode(group, tokenizer, max_length)
            if batch is not None:
                yield batch
            group = []
    if group:
        batch = _encode(group, tokenizer, max_length)
        if batch is not None:
            yield batch


def _encode(group: list[Document], tokenizer: Any, max_length: int) -> Batch | None:
    encoded = tokenizer([doc.text for doc in group], truncation=True, max_length=max_length, padding=False)
    pairs = [(doc.example_id, ids) for doc, ids in zip(group, encoded["input_ids"]) if len(ids) > 0]
    if not pairs:
        return None
    longest = max(len(ids) for _, ids in pairs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(pairs), longest), pad_id, dtype=torch.long)
    for row, (_, ids) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return Batch([eid for eid, _ in pairs], [len(ids) for _, ids in pairs], input_ids, group[-1].index + 1)
