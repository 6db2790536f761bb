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
    skipped: int = 0  # documents of this group with no tokens (empty texts), left out

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def batch_of(index: int, batch_size: int) -> int:
    """The batch a dataset index belongs to: batches are runs of ``batch_size`` consecutive documents.

    This fixed grouping (by dataset index, empty documents included) is what makes a
    batch the same whatever process forms it: torchrun ranks take whole batches.
    """
    return index // batch_size


def tokenize_batches(
    documents: Iterable[Document], tokenizer: Any, *, max_length: int, batch_size: int
) -> Iterator[Batch]:
    """Group documents into the batches of :func:`batch_of`; documents with no tokens are left out.

    ``documents`` may skip whole batches (another rank's) but never part of one.
    A group whose documents all have no tokens yields a batch with no rows (it still
    advances the resume cursor and counts its skipped documents).
    """
    group: list[Document] = []
    for document in documents:
        if group and batch_of(document.index, batch_size) != batch_of(group[0].index, batch_size):
            yield _encode(group, tokenizer, max_length)
            group = []
        group.append(document)
    if group:
        yield _encode(group, tokenizer, max_length)


def _encode(group: list[Document], tokenizer: Any, max_length: int) -> Batch:
    encoded = tokenizer([doc.text for doc in group], truncation=True, max_length=max_length, padding=False)
    pairs = [(doc.example_id, ids) for doc, ids in zip(group, encoded["input_ids"]) if len(ids) > 0]
    longest = max((len(ids) for _, ids in pairs), default=0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(pairs), longest), pad_id, dtype=torch.long)
    for row, (_, ids) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return Batch(
        [eid for eid, _ in pairs],
        [len(ids) for _, ids in pairs],
        input_ids,
        group[-1].index + 1,
        skipped=len(group) - len(pairs),
    )
