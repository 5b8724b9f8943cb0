"""Which waiting documents go into the next forward pass. A plain object with no I/O and no
model, so its rules are unit-tested with made-up lengths (after vLLM's scheduler split).

The unit of work is the padded token count of a batch, ``longest × count``: that is what a
padded forward pass costs. A batch never exceeds ``max_batch_tokens`` or ``max_batch_size``.
The oldest waiting document always goes first, so nothing waits behind later arrivals forever.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Payload = TypeVar("Payload")


@dataclass
class ScheduledDocument(Generic[Payload]):
    token_count: int
    payload: Payload = field(repr=False)


class TokenBudgetScheduler(Generic[Payload]):
    def __init__(self, max_batch_tokens: int, max_batch_size: int, max_document_tokens: int):
        if max_batch_tokens < max_document_tokens:
            raise ValueError("max_batch_tokens must hold at least one document of max_document_tokens")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_document_tokens = max_document_tokens
        self._waiting: deque[ScheduledDocument[Payload]] = deque()
        self.waiting_tokens = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, document: ScheduledDocument[Payload]) -> None:
        if not 0 < document.token_count <= self.max_document_tokens:
            raise ValueError(f"token_count {document.token_count} outside 1..{self.max_document_tokens}")
        self._waiting.append(document)
        self.waiting_tokens += document.token_count

    def next_batch(self) -> list[ScheduledDocument[Payload]]:
        """Take the longest FIFO prefix of waiting documents whose padded size fits the budget."""
        batch: list[ScheduledDocument[Payload]] = []
        longest = 0
        while self._waiting and len(batch) < self.max_batch_size:
            candidate = self._waiting[0]
            widest = max(longest, candidate.token_count)
            if widest * (len(batch) + 1) > self.max_batch_tokens:
                break
            batch.append(self._waiting.popleft())
            self.waiting_tokens -= candidate.token_count
            longest = widest
        return batch
