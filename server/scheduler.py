"""Which waiting documents go into the next forward pass. A plain object with no I/O, no
threads and no model, so its rules are unit-tested with made-up lengths (after vLLM's
scheduler/executor split).

Rules:
- The unit of work is the padded token count of a batch, ``width × count``, where the width is
  the widest document rounded up to ``width_multiple`` (the engine pads to tensor-core friendly
  widths): what a padded forward pass computes; for an engine that packs documents end to end
  (``padded=False``), the sum of their tokens. A batch never exceeds ``max_batch_tokens`` or
  ``max_batch_size``.
- The oldest waiting document always goes into the next batch, so no document waits behind
  later arrivals for more than the batches needed to clear the documents ahead of it.
- The rest of the batch is chosen, among the oldest ``window`` waiting documents, by closeness
  of length to that oldest one: long patents ride with long ones, short with short, and
  padding stays small without sorting the whole queue. Packed batches have no padding to
  avoid: they take the waiting documents in arrival order, each one that still fits.
- The queue is bounded in tokens (``max_queue_tokens``): ``admit`` refuses work that would
  overflow it, so an overloaded server says so at once instead of growing latency. A request is
  counted before it is tokenized, at the most its documents can take (``reserve``), and settled
  to its real tokens when it is admitted: overload is refused before any tokenizing is paid.
- Expired documents (past their deadline) and dropped ones (``is_dropped``, e.g. a cancelled
  request) leave the queue without being batched, and are handed back to be failed.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

from core.engine import padded_width

Payload = TypeVar("Payload")


@dataclass
class ScheduledDocument(Generic[Payload]):
    token_count: int
    payload: Payload = field(repr=False)
    deadline: float | None = None  # time.monotonic() instant after which computing it is pointless
    enqueued_at: float = 0.0
    sequence: int = field(default=0, repr=False)


@dataclass
class ScheduledBatch(Generic[Payload]):
    documents: list[ScheduledDocument[Payload]]
    expired: list[ScheduledDocument[Payload]]  # removed: deadline passed while queued
    dropped: list[ScheduledDocument[Payload]]  # removed: is_dropped said so (cancelled, failed)

    width_multiple: int = 1

    @property
    def width(self) -> int:
        """What the forward pass computes per document: the widest, rounded up to ``width_multiple``."""
        return padded_width(max((d.token_count for d in self.documents), default=0), self.width_multiple)

    @property
    def padded_tokens(self) -> int:
        """What a padded forward pass computes (a packed one computes ``real_tokens``)."""
        return self.width * len(self.documents)

    @property
    def real_tokens(self) -> int:
        return sum(d.token_count for d in self.documents)


class TokenBudgetScheduler(Generic[Payload]):
    def __init__(
        self,
        max_batch_tokens: int,
        max_batch_size: int,
        max_document_tokens: int,
        max_queue_tokens: int | None = None,
        window: int = 1024,
        is_dropped: Callable[[Payload], bool] = lambda payload: False,
        width_multiple: int = 1,
        padded: bool = True,
    ):
        if max_batch_tokens < padded_width(max_document_tokens, width_multiple):
            raise ValueError(
                "max_batch_tokens must hold at least one document of max_document_tokens, padded to width_multiple"
            )
        if max_queue_tokens is not None and max_queue_tokens < max_document_tokens:
            raise ValueError("max_queue_tokens must hold at least one document of max_document_tokens")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.max_document_tokens = max_document_tokens
        self.max_queue_tokens = max_queue_tokens
        self.window = max(window, max_batch_size)
        self.is_dropped = is_dropped
        self.width_multiple = width_multiple
        self.padded = padded
        self._waiting: dict[int, ScheduledDocument[Payload]] = {}  # insertion order = arrival order
        self._sequence = itertools.count()
        self.waiting_tokens = 0
        self.reserved_tokens = 0  # held by requests being tokenized (reserve), not yet admitted

    def _fits(self, tokens: int) -> bool:
        return self.max_queue_tokens is None or self.waiting_tokens + self.reserved_tokens + tokens <= self.max_queue_tokens

    def reserve(self, tokens: int) -> bool:
        """Hold ``tokens`` of the queue's bound for a request about to be tokenized, or False when
        they do not fit beside what is queued and reserved. ``admit(..., reserved=tokens)`` or
        ``release(tokens)`` gives them back."""
        if not self._fits(tokens):
            return False
        self.reserved_tokens += tokens
        return True

    def release(self, tokens: int) -> None:
        self.reserved_tokens -= tokens

    def __len__(self) -> int:
        return len(self._waiting)

    def admit(self, documents: list[ScheduledDocument[Payload]], reserved: int = 0) -> bool:
        """Queue all of ``documents`` (one request's) or none: False when the token bound would overflow.
        ``reserved``: what ``reserve`` held for them, released here whatever the outcome."""
        self.release(reserved)
        incoming = sum(d.token_count for d in documents)
        for document in documents:
            if not 0 < document.token_count <= self.max_document_tokens:
                raise ValueError(f"token_count {document.token_count} outside 1..{self.max_document_tokens}")
        if not self._fits(incoming):
            return False
        for document in documents:
            document.sequence = next(self._sequence)
            self._waiting[document.sequence] = document
        self.waiting_tokens += incoming
        return True

    def next_batch(self, now: float) -> ScheduledBatch[Payload]:
        expired, dropped, candidates = [], [], []
        for document in self._waiting.values():
            if document.deadline is not None and document.deadline <= now:
                expired.append(document)
            elif self.is_dropped(document.payload):
                dropped.append(document)
            else:
                candidates.append(document)
                if len(candidates) == self.window:
                    break
        batch: list[ScheduledDocument[Payload]] = []
        if candidates and not self.padded:
            batch = self._in_arrival_order(candidates)
        elif candidates:
            oldest = candidates[0]
            by_closeness = sorted(candidates[1:], key=lambda d: (abs(d.token_count - oldest.token_count), d.sequence))
            batch, widest = [oldest], oldest.token_count
            for document in by_closeness:
                if len(batch) == self.max_batch_size:
                    break
                wider = max(widest, document.token_count)
                if padded_width(wider, self.width_multiple) * (len(batch) + 1) <= self.max_batch_tokens:
                    batch.append(document)
                    widest = wider
            batch.sort(key=lambda d: d.sequence)
        for document in itertools.chain(batch, expired, dropped):
            del self._waiting[document.sequence]
            self.waiting_tokens -= document.token_count
        return ScheduledBatch(batch, expired, dropped, self.width_multiple)

    def _in_arrival_order(self, candidates: list[ScheduledDocument[Payload]]) -> list[ScheduledDocument[Payload]]:
        batch, tokens = [], 0
        for document in candidates:
            if len(batch) == self.max_batch_size:
                break
            if tokens + document.token_count <= self.max_batch_tokens:
                batch.append(document)
                tokens += document.token_count
        return batch

    def drain(self) -> list[ScheduledDocument[Payload]]:
        """Remove and return everything waiting (shutdown)."""
        documents = list(self._waiting.values())
        self._waiting.clear()
        self.waiting_tokens = 0
        return documents
