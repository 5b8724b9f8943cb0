"""Each request's future completes exactly once, however its documents, deadline, cancellation
and the engine's two threads interleave, and the engine stays healthy.

The forward pass is replaced by one that returns at once, so ten thousand requests put the
engine's bookkeeping (not the model) under stress; thread switches are forced far more often
than Python's default so that races show within one run."""
from __future__ import annotations

import random
import sys
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from core.errors import Cancelled, DeadlineExceeded
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from server.torch_engine import TorchEngine
from tests.conftest import MAX_LENGTH

pytestmark = pytest.mark.model  # the PyTorch engine over the exported demo

REQUESTS = 10_000
SUBMITTING_THREADS = 4


@pytest.fixture
def instant_engine(exported):
    engine = TorchEngine(ServingConfig(
        model_dir=exported.merged_dir, max_length=MAX_LENGTH, device="cpu",
        # Small batches: a request of several documents is split across batches.
        max_batch_tokens=MAX_LENGTH, max_batch_size=3, max_queue_tokens=REQUESTS * 8 * MAX_LENGTH,
    ))
    engine.start()
    labels = len(engine.labels)
    engine._forward = lambda input_ids, attention_mask: np.full((input_ids.shape[0], labels), 1 / labels, np.float32)
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
    give_up = time.monotonic() + 120
    while not all(future.done() for future in futures) and time.monotonic() < give_up:
        time.sleep(0.2)
    stop_cancelling.set()
    canceller.join()

    not_done = sum(not future.done() for future in futures)
    assert not not_done, f"{not_done} futures never completed; engine healthy: {instant_engine.is_healthy()}"
    assert instant_engine.is_healthy()
    time.sleep(0.1)  # callbacks of the last completions run on the engine's threads
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
