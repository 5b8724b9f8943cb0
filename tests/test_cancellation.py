"""A gRPC caller that cancels its request gets ``Cancelled``, and the engine drops the work
instead of computing it. (KServe v2 over HTTP has no cancellation: closing the connection does
not cancel in tritonserver 2.51, so a caller there bounds its wait with a timeout instead.)

The engine is held (server/engine_hold.py) while the requests are queued and the cancellation
is sent, so the request is still waiting when the engine looks, however fast the machine."""
from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc

from patent_classifier_client import PatentClassifier
from patent_classifier_client.patent_classifier import typed_error
from patent_classifier_client.errors import Cancelled
from core.synthetic_patents import synthetic_patents
from tests.conftest import MODEL_NAME, held_engines
from tests.test_monitoring import scrape, value
from tests.waiting import wait_until

pytestmark = pytest.mark.server  # through the real tritonserver

PATENTS = synthetic_patents(4, seed=51, long_share=1.0)
AHEAD, CANCELLED, BEHIND = PATENTS[0:2], PATENTS[2], PATENTS[3]
WAIT_S = 60.0


def metric(server, name: str, **labels: str) -> float:
    samples, _ = scrape(server.metrics_url)
    return value(samples, name, model=MODEL_NAME, **labels)


def test_a_cancelled_grpc_request_is_dropped_before_compute(server):
    cancelled_before = metric(server, "pc_requests_failed_total", err="cancelled")
    client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
    outcomes: dict[str, queue.Queue] = {}

    def request(name: str, document):
        tensor = tritonclient.grpc.InferInput("TEXT", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([document.render().encode()], dtype=np.object_))
        outcomes[name] = queue.Queue()
        return client.async_infer(MODEL_NAME, [tensor], callback=lambda result, error: outcomes[name].put((result, error)))

    try:
        with held_engines():
            for index, document in enumerate(AHEAD):
                request(f"ahead-{index}", document)
            waiting = request("cancelled", CANCELLED)
            wait_until(lambda: metric(server, "pc_queue_documents") == len(AHEAD) + 1, "the requests queued in the held engine")
            waiting.cancel()
            # Sent after the cancellation on the same connection: once the engine holds it, the
            # server has read the cancellation that came before it.
            request("behind", BEHIND)
            wait_until(lambda: metric(server, "pc_queue_documents") == len(AHEAD) + 2, "the request behind queued")
        results = {name: answers.get(timeout=WAIT_S) for name, answers in outcomes.items()}
    finally:
        client.close()

    result, error = results.pop("cancelled")
    assert result is None and isinstance(typed_error(error), Cancelled)
    assert all(result is not None and error is None for result, error in results.values())  # the others were answered
    wait_until(lambda: metric(server, "pc_requests_failed_total", err="cancelled") == cancelled_before + 1,
             "the server counted the cancellation")
    with PatentClassifier(server.grpc_url, model=MODEL_NAME) as classifier:
        assert classifier.classify(CANCELLED).token_count == 512
