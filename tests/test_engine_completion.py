"""Each request's future completes exactly once, however its documents, deadline, cancellation
and the engine's two threads interleave, and the engine stays healthy.

The model is replaced by one that answers at once, at the one point every batch (packed or
padded) goes through, and the test checks that the stub is what ran for every batch: ten
thousand requests then put the engine's bookkeeping (not the model) under stress. Thread
switches are forced far more often than Python's default so that races show within one run.
Nothing is timed: the waits give up only when nothing has completed for a long while."""
from __future__ import annotations

import random
import sys
import threading
import time
from concurrent.futures import Future

import pytest
import torch

from patent_classifier_client.errors import Cancelled, DeadlineExceeded
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from server.torch_engine import TorchEngine
from tests.conftest import MAX_LENGTH
from tests.waiting import wait_while_progressing

pytestmark = pytest.mark.model  # the PyTorch engine over the exported demo

REQUESTS = 10_000
SUBMITTING_THREADS = 4
# No future has completed for this long: the engine is stuck, however slow the machine.
STALL_S = 60.0


@pytest.fixture
def instant_engine(exported):
    engine = TorchEngine(ServingConfig(
        model_dir=exported.merged_dir, max_length=MAX_LENGTH, device="cpu",
        # Small batches: a request of several documents is split across batches.
        max_batch_tokens=MAX_LENGTH, max_batch_size=3, max_queue_tokens=REQUESTS * 8 * MAX_LENGTH,
    ))
    engine.start()
    labels = len(engine.labels)
    engine.stub_calls = []  # documents per call
    engine.batches = []
    engine.observe_batches(engine.batches.append)

    def instant_model(batch):
        engine.stub_calls.append(len(batch.documents))
        return torch.zeros((len(batch.documents), labels))

    def real_model(*args):
        raise AssertionError("the real model ran: the stub is not on every batch's path")

    engine._logits = instant_model
    engine._forward = engine._packed.logits = real_model
    yield engine
    engine.stop(drain_timeout_s=30)


class YieldingFuture(Future):
    """Hands the interpreter to another thread whenever the engine's compute thread asks whether
    it is done: a check of done() followed by a set_*() there is then often interrupted by the
    racing thread. (Only there: the prepare thread asks for every queued document, and
    yielding each time would slow the engine to a crawl.)"""

    def done(self) -> bool:
        finished = super().done()
        if threading.current_thread().name == "engine-compute":
            time.sleep(0)
        return finished


@pytest.fixture
def frequent_thread_switches(monkeypatch):
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    monkeypatch.setattr("core.engine.Future", YieldingFuture)
    yield
    sys.setswitchinterval(interval)


def test_ten_thousand_racing_requests_each_complete_exactly_once(instant_engine, frequent_thread_switches):
    rng = random.Random(15)
    texts = [document.render()[: rng.randint(20, 400)] for document in synthetic_patents(64, seed=15, long_share=0.3)]
    plans = []
    for index in range(REQUESTS):
        count = rng.choice([1, 1, 2, 4, 7])
        fate = rng.choice(["plain", "deadline", "caller cancels", "probe cancels", "probe raises"])
        plans.append((index, [rng.choice(texts) for _ in range(count)], fate, rng.uniform(0, 0.004)))

    futures: list[Future | None] = [None] * REQUESTS
    completions = [0] * REQUESTS
    counting = threading.Lock()
    to_cancel: list[tuple[float, Future]] = []

    def count_completion(index: int):
        def done(_: Future) -> None:
            with counting:
                completions[index] += 1
        return done

    def probe(fate: str, at: float):
        def is_cancelled() -> bool:
            if fate == "probe raises":
                raise RuntimeError("the caller's probe failed")
            return time.monotonic() >= at
        return is_cancelled if fate in ("probe cancels", "probe raises") else None

    def submit(share):
        for index, request_texts, fate, delay in share:
            now = time.monotonic()
            deadline = now + delay if fate == "deadline" else None
            future = instant_engine.submit(request_texts, deadline, probe(fate, now + delay))
            future.add_done_callback(count_completion(index))
            futures[index] = future
            if fate == "caller cancels":
                with counting:
                    to_cancel.append((now + delay, future))

    stop_cancelling = threading.Event()

    def cancel_when_due():
        while not stop_cancelling.is_set():
            with counting:
                due = [item for item in to_cancel if item[0] <= time.monotonic()]
                for item in due:
                    to_cancel.remove(item)
            for _, future in due:
                future.cancel()

    canceller = threading.Thread(target=cancel_when_due)
    canceller.start()
    submitters = [threading.Thread(target=submit, args=(plans[n::SUBMITTING_THREADS],)) for n in range(SUBMITTING_THREADS)]
    for thread in submitters:
        thread.start()
    for thread in submitters:
        thread.join()
    # Polled, not concurrent.futures.wait(): that counts a future cancel()ed by its caller as pending.
    try:
        wait_while_progressing(lambda: sum(future.done() for future in futures), REQUESTS,
                               f"futures never completed (engine healthy: {instant_engine.is_healthy()})", STALL_S)
        # A future is done before its callbacks have run (on the thread that completed it).
        wait_while_progressing(lambda: sum(map(bool, completions)), REQUESTS, "done callbacks never ran", STALL_S)
    finally:
        stop_cancelling.set()
        canceller.join()
    assert instant_engine.is_healthy()
    assert completions == [1] * REQUESTS


    outcomes = {"answered": 0, "deadline": 0, "cancelled": 0}
    for (_, request_texts, fate, _), future in zip(plans, futures):
        if future.cancelled():
            assert fate == "caller cancels"
            outcomes["cancelled"] += 1
            continue
        try:
            scores = future.result()
        except DeadlineExceeded:
            assert fate == "deadline"
            outcomes["deadline"] += 1
            continue
        except Cancelled:
            assert fate in ("caller cancels", "probe cancels")
            outcomes["cancelled"] += 1
            continue
        assert len(scores) == len(request_texts) and all(score is not None for score in scores)
        outcomes["answered"] += 1
    assert all(outcomes.values()), outcomes  # every fate really happened

    # And the engine still answers.
    (scores,) = instant_engine.submit([texts[0]]).result(timeout=30)
    assert scores.probabilities.shape == (len(instant_engine.labels),)

    # The stub, and nothing else, computed every batch (this last one's stats were published
    # before its answer, and after every earlier batch's).
    assert instant_engine.stub_calls == [batch.documents for batch in instant_engine.batches]
    assert sum(instant_engine.stub_calls) >= outcomes["answered"]
