"""A gRPC caller that cancels its request gets ``Cancelled``, and the engine drops the work
instead of computing it. (KServe v2 over HTTP has no cancellation: closing the connection does
not cancel in tritonserver 2.51, so a caller there bounds its wait with a timeout instead.)"""
from __future__ import annotations

import queue
import time

import numpy as np
import tritonclient.grpc

from clients import PatentClassifier
from clients.patent_classifier import typed_error
from core.errors import Cancelled
from core.synthetic_patents import synthetic_patents
from tests.conftest import MODEL_NAME
from tests.test_monitoring import scrape, value

PATENTS = synthetic_patents(33, seed=51, long_share=1.0)
AHEAD = 32  # full-length patents queued ahead of the one that is cancelled: several forward passes


def cancelled_count(server) -> float:
    samples, _ = scrape(server.metrics_url)
    return value(samples, "pc_requests_failed_total", model=MODEL_NAME, err="cancelled")


def test_a_cancelled_grpc_request_is_dropped_before_compute(server):
    before = cancelled_count(server)
    client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
    outcomes: queue.Queue = queue.Queue()

    def request(document):
        tensor = tritonclient.grpc.InferInput("TEXT", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([document.render().encode()], dtype=np.object_))
        return client.async_infer(MODEL_NAME, [tensor], callback=lambda result, error: outcomes.put((result, error)))

    try:
        # The last one waits in the engine's queue, where the engine checks for cancellation.
        for document in PATENTS[:AHEAD]:
            request(document)
        waiting = request(PATENTS[AHEAD])
        time.sleep(0.05)
        waiting.cancel()
        results = [outcomes.get(timeout=120) for _ in range(AHEAD + 1)]
    finally:
        client.close()
    errors = [typed_error(error) for _, error in results if error is not None]
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)
    assert sum(result is not None for result, _ in results) == AHEAD  # the others were answered

    deadline = time.monotonic() + 15  # the server learns of the cancellation when it next looks
    while cancelled_count(server) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancelled_count(server) == before + 1
    with PatentClassifier(server.grpc_url, model=MODEL_NAME) as classifier:
        assert classifier.classify(PATENTS[AHEAD]).token_count == 512
