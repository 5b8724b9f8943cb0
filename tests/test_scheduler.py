"""TokenBudgetScheduler rules, with made-up lengths and no model."""
import math
import random

import pytest

from server.scheduler import ScheduledDocument, TokenBudgetScheduler


def scheduler(max_batch_tokens=2048, max_batch_size=8, max_document_tokens=512, **kwargs):
    return TokenBudgetScheduler(max_batch_tokens, max_batch_size, max_document_tokens, **kwargs)


def add(s, *lengths, deadline=None, first_payload=0):
    for offset, length in enumerate(lengths):
        assert s.admit([ScheduledDocument(length, first_payload + offset, deadline)])


def drain(s, now=0.0):
    batches = []
    while (batch := s.next_batch(now)).documents:
        batches.append(batch)
    return batches


def test_budget_and_size_cap_are_never_exceeded_and_every_document_is_taken_exactly_once():
    rng = random.Random(3)
    s = scheduler()
    lengths = [rng.choice([512, 512, 512, rng.randint(20, 511)]) for _ in range(500)]
    add(s, *lengths)
    batches = drain(s)
    for batch in batches:
        assert batch.padded_tokens <= 2048 and len(batch.documents) <= 8
    taken = sorted(d.payload for batch in batches for d in batch.documents)
    assert taken == list(range(500))
    assert s.waiting_tokens == 0 and len(s) == 0


def test_documents_of_similar_length_are_grouped_to_keep_padding_small():
    rng = random.Random(7)
    s = scheduler(max_batch_tokens=16384, max_batch_size=64)
    lengths = [512 if rng.random() < 0.7 else rng.randint(40, 300) for _ in range(2000)]
    add(s, *lengths)
    batches = drain(s)
    padded = sum(b.padded_tokens for b in batches)
    real = sum(b.real_tokens for b in batches)
    assert 1 - real / padded < 0.05
    # In arrival order with no grouping, the same mix would waste far more:
    fifo_padded = sum(max(lengths[i : i + 32]) * len(lengths[i : i + 32]) for i in range(0, len(lengths), 32))
    assert 1 - real / fifo_padded > 0.15


def test_a_long_patent_is_not_starved_by_a_stream_of_short_ones():
    s = scheduler(max_batch_tokens=2048, max_batch_size=8)
    add(s, *[30] * 20, first_payload=100)  # 20 short documents ahead of it
    add(s, 512, first_payload=0)
    for round_ in range(1, 50):
        add(s, *[30] * 8, first_payload=1000 + 8 * round_)  # and more keep coming
        batch = s.next_batch(0.0)
        assert batch.documents[0].sequence == min(d.sequence for d in batch.documents)
        if 0 in [d.payload for d in batch.documents]:
            break
    assert round_ <= math.ceil(20 / 8) + 1  # the batches that clear what was ahead of it, then its own


def test_expired_documents_leave_the_queue_unbatched():
    s = scheduler()
    add(s, 100, deadline=5.0, first_payload=0)
    add(s, 100, deadline=50.0, first_payload=1)
    add(s, 100, first_payload=2)
    batch = s.next_batch(now=10.0)
    assert [d.payload for d in batch.expired] == [0]
    assert sorted(d.payload for d in batch.documents) == [1, 2]
    assert s.waiting_tokens == 0


def test_dropped_documents_leave_the_queue_unbatched():
    cancelled = {1}
    s = scheduler(is_dropped=lambda payload: payload in cancelled)
    add(s, 100, 100, 100)
    batch = s.next_batch(0.0)
    assert [d.payload for d in batch.dropped] == [1]
    assert [d.payload for d in batch.documents] == [0, 2]


def test_a_full_queue_refuses_whole_requests():
    s = scheduler(max_queue_tokens=1000)
    assert s.admit([ScheduledDocument(400, "a"), ScheduledDocument(400, "b")])
    assert not s.admit([ScheduledDocument(100, "c"), ScheduledDocument(150, "d")])  # 1050 > 1000: none of it
    assert len(s) == 2 and s.waiting_tokens == 800
    assert s.admit([ScheduledDocument(200, "e")])


def test_a_reservation_counts_before_tokenizing_and_admission_settles_it_to_the_real_tokens():
    """A request is counted at the most its documents can take (max_document_tokens each) before it
    is tokenized, so a full queue refuses it before that cost; admitted, it counts its real tokens."""
    s = scheduler(max_queue_tokens=1536)
    assert s.reserve(2 * 512)
    assert not s.reserve(2 * 512)  # 1024 reserved + 1024 > 1536, though the queue holds nothing yet
    assert s.reserve(512) and s.reserved_tokens == 1536
    assert s.admit([ScheduledDocument(30, "a"), ScheduledDocument(40, "b")], reserved=2 * 512)
    assert (s.waiting_tokens, s.reserved_tokens) == (70, 512)
    s.release(512)  # its tokenizing failed
    assert (s.waiting_tokens, s.reserved_tokens) == (70, 0)
    assert s.reserve(1536 - 70) and not s.reserve(1)


def test_documents_over_the_model_limit_are_refused():
    with pytest.raises(ValueError):
        scheduler().admit([ScheduledDocument(513, "too long")])
    with pytest.raises(ValueError):
        TokenBudgetScheduler(max_batch_tokens=256, max_batch_size=8, max_document_tokens=512)


def test_the_budget_counts_widths_as_the_engine_pads_them():
    # 63 documents of 257 tokens: 16,191 unpadded, but computed 272 wide (a multiple of 16): 17,136.
    s = scheduler(max_batch_tokens=16384, max_batch_size=64, max_document_tokens=512, width_multiple=16)
    add(s, *[257] * 63)
    batches = drain(s)
    assert sum(len(batch.documents) for batch in batches) == 63
    assert all(batch.width == 272 and batch.padded_tokens <= 16384 for batch in batches)
    assert len(batches[0].documents) == 16384 // 272


def test_a_budget_below_one_padded_document_is_refused():
    with pytest.raises(ValueError, match="padded to width_multiple"):
        scheduler(max_batch_tokens=508, max_document_tokens=500, width_multiple=16)


def test_packed_batches_count_real_tokens_and_take_documents_in_arrival_order():
    """An engine that packs documents end to end computes their tokens and no padding: the budget
    holds their sum, and with nothing to pad there is no reason to pass anyone in the queue, except
    to fill the budget with a later document that still fits."""
    s = scheduler(max_batch_tokens=1024, max_batch_size=8, padded=False)
    add(s, 512, 100, 512, 300, 40)
    first = s.next_batch(0.0)
    assert [d.payload for d in first.documents] == [0, 1, 3, 4]  # 952 tokens; the second 512 would overflow
    assert first.real_tokens == 952 <= 1024 < first.padded_tokens
    assert [d.payload for d in s.next_batch(0.0).documents] == [2]


def test_packed_batches_never_exceed_the_budget_or_the_size_cap_and_lose_nothing():
    rng = random.Random(5)
    s = scheduler(max_batch_tokens=1024, max_batch_size=8, padded=False)
    lengths = [rng.choice([512, rng.randint(5, 511)]) for _ in range(400)]
    add(s, *lengths)
    batches = drain(s)
    assert all(b.real_tokens <= 1024 and len(b.documents) <= 8 for b in batches)
    assert sorted(d.payload for b in batches for d in b.documents) == list(range(400))
