"""Requests from Triton to the engine and answers back: each request gets exactly one final
response, whatever fails on the way.

``server/triton/model.py`` hands each request of an ``execute`` call to ``RequestDispatch.accept``
with callables that read the request and build responses in Triton's terms; everything else
lives here, testable without Triton. A request is either refused at once (its decoding or
its admission failed, with a typed error or with anything else) or handed to the engine,
whose future then completes exactly once and queues the answer; one ``triton-answers``
thread builds and sends answers, so the engine's threads never block on Triton's IPC. Once a
request is handed on, nothing on the ``execute`` path answers it again, and a failure while
building or sending one answer never stops the thread that sends the others.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Protocol, Sequence

from patent_classifier_client import protocol
from core.engine import ClassificationEngine, DocumentScores
from patent_classifier_client.errors import EngineFailure, ErrorKind, ServingError
from core.labels import LabelSet
from server.prediction_records import PredictionIds

log = logging.getLogger("patent_classifier.triton")

_STOP = object()


class ResponseSender(Protocol):
    """Triton's ``InferenceResponseSender``, as far as the dispatch uses it."""

    def is_cancelled(self) -> bool: ...


class Replies(Protocol):
    """Builds and sends a final response in Triton's terms (pb_utils lives only in the stub)."""

    def answer(self, sender: ResponseSender, tensors: dict[str, Any]) -> None: ...

    def refuse(self, sender: ResponseSender, error: ServingError) -> None: ...


class RequestMetrics(Protocol):
    def request_received(self) -> None: ...

    def answered(self, scores: Sequence[DocumentScores], seconds: float) -> None: ...

    def failed(self, kind: ErrorKind, seconds: float) -> None: ...


class PredictionRecords(Protocol):
    """Ids for an answer's documents, and their records kept (server.prediction_records)."""

    def record(self, texts: Sequence[str], documents, scores: Sequence[DocumentScores], top_k: int) -> list[str]: ...


class RequestDispatch:
    def __init__(
        self, engine: ClassificationEngine, labels: LabelSet, replies: Replies, metrics: RequestMetrics,
        records: PredictionRecords | None = None,
    ):
        self.engine, self.labels, self.replies, self.metrics = engine, labels, replies, metrics
        self.records = records or PredictionIds()
        self._answers: queue.Queue = queue.Queue()
        # Held while a reply goes out: close() returns only once none is on its way (server.dead_engine_exit).
        self._replying, self._closed = threading.Lock(), False
        self._thread = threading.Thread(target=self._send_answers, name="triton-answers", daemon=True)
        self._thread.start()

    def accept(
        self, sender: ResponseSender, read: Callable[[], tuple[protocol.ClassifyRequest, float | None]]
    ) -> None:
        """Decode one request with ``read`` (its texts and deadline) and hand it to the engine, or refuse it."""
        received = time.monotonic()
        try:
            self.metrics.request_received()
            decoded, deadline = read()
            future = self.engine.submit(decoded.texts, deadline, sender.is_cancelled)
        except ServingError as error:
            self._refuse(sender, error, received)
            return
        except Exception as exc:  # a fault of ours: this request fails, the others of the call go on
            log.exception("accepting a request failed")
            self._refuse(sender, EngineFailure.internal(exc), received)
            return
        future.add_done_callback(lambda done: self._answers.put((sender, done, decoded, received)))

    def send_queued(self, timeout_s: float) -> None:
        """Wait, up to ``timeout_s``, until every answer queued so far has been sent."""
        deadline = time.monotonic() + timeout_s
        with self._answers.all_tasks_done:
            while self._answers.unfinished_tasks and (left := deadline - time.monotonic()) > 0:
                self._answers.all_tasks_done.wait(left)

    def stop(self, timeout_s: float = 30.0) -> None:
        """After the engine stopped (every future complete): send what is queued, then end the thread."""
        self._answers.put(_STOP)
        self._thread.join(timeout=timeout_s)

    def close(self) -> None:
        """Send no reply from now on, and return once the last one on its way has gone out: the stub is
        about to exit, and a request it leaves unanswered is failed by tritonserver when it does."""
        with self._replying:
            self._closed = True

    def _refuse(self, sender: ResponseSender, error: ServingError, received: float) -> None:
        try:
            self.metrics.failed(error.kind, time.monotonic() - received)
            with self._replying:
                if not self._closed:
                    self.replies.refuse(sender, error)
        except Exception:
            log.exception("sending a refusal failed")

    def _send_answers(self) -> None:
        while (item := self._answers.get()) is not _STOP:
            sender, future, request, received = item
            self._send_answer(sender, future, request, received)
            self._answers.task_done()

    def _send_answer(
        self, sender: ResponseSender, future: "Future[list[DocumentScores]]", request: protocol.ClassifyRequest, received: float
    ) -> None:
        try:
            scores = future.result()
            # Before the answer leaves: its records are journaled (not yet in the database) by then.
            ids = self.records.record(request.texts, request.documents, scores, request.top_k)
            tensors = protocol.encode_answer(scores, self.labels, request.top_k, ids)
        except ServingError as error:
            self._refuse(sender, error, received)
            return
        except Exception as exc:  # never leave a client waiting on an answer we failed to build
            log.exception("building an answer failed")
            self._refuse(sender, EngineFailure.internal(exc), received)
            return
        try:
            with self._replying:
                if self._closed:
                    return
                self.replies.answer(sender, tensors)
            self.metrics.answered(scores, time.monotonic() - received)
        except Exception:
            log.exception("sending an answer failed")
