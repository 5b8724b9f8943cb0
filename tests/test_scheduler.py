"""TokenBudgetScheduler rules, with made-up lengths and no model."""
import random

import pytest

from server.scheduler import ScheduledDocument, TokenBudgetScheduler


def scheduler(max_batch_tokens=2048, max_batch_size=8, max_document_tokens=512):
    return TokenBudgetScheduler(max_batch_tokens, max_batch_size, max_document_tokens)


def drain(s):
    batches = []
    while batch := s.next_batch():
        batches.append(batch)
    return batches


def test_padded_budget_and_size_cap_are_never_exceeded_and_every_document_is_taken_once():
    rng = random.Random(3)
    s = scheduler()
    lengths = [rng.choice([512, 512, 512, rng.randint(20, 511)]) for _ in range(500)]
    for index, length in enumerate(lengths):
        s.add(ScheduledDocument(length, index))
    batches = drain(s)
    for batch in batches:
        assert max(d.token_count for d in batch) * len(batch) <= 2048
        assert len(batch) <= 8
    assert [d.payload for batch in batches for d in batch] == list(range(500))  # FIFO, exactly once
    assert s.waiting_tokens == 0 and len(s) == 0


def test_short_documents_fill_a_batch_up_to_the_size_cap():
    s = scheduler(max_batch_tokens=8192, max_batch_size=16)
    for index in range(40):
        s.add(ScheduledDocument(30, index))
    assert [len(b) for b in drain(s)] == [16, 16, 8]


def test_a_long_document_closes_the_batch_it_would_overflow():
    s = scheduler(max_batch_tokens=1024)
    for index, length in enumerate([100, 100, 512, 100]):
        s.add(ScheduledDocument(length, index))
    assert [[d.payload for d in b] for b in drain(s)] == [[0, 1], [2, 3]]


def test_documents_over_the_model_limit_are_refused():
    with pytest.raises(ValueError):
        scheduler().add(ScheduledDocument(513, "too long"))
    with pytest.raises(ValueError):
        TokenBudgetScheduler(max_batch_tokens=256, max_batch_size=8, max_document_tokens=512)
