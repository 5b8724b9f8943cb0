"""The served model's own Prometheus metrics, through Triton's custom-metrics API, so they appear
on Triton's metrics port beside ``nv_inference_*``. Names take TEI's ``te_*`` vocabulary with our
prefix ``pc_`` (patent classifier) and follow Prometheus's conventions: Triton exports a name as
given, so counters carry their ``_total`` themselves, durations are ``_seconds`` and every other
quantity names its unit (documents, tokens, ratio). Every series carries the ``model`` label and
the ``model_instance`` label (Triton's instance name, ``kscst-gemma2_0_1``): each instance of a
model is a stub process with an engine of its own, and two of them setting one gauge would
overwrite each other. (Not ``instance``: Prometheus gives that name to the scraped target.)

Each update is an IPC round trip from the Python stub to tritonserver, so nothing here runs on
the engine's threads or on ``execute``: callers put events on a queue and one ``triton-metrics``
thread applies them (as Triton's vllm_backend does with its stat logger). It takes what is
queued in rounds and sums each round's counters into one update per series (histograms still
observe each value: Triton's API has no other way). The queue is bounded: when the thread falls
behind, new events are dropped and counted (``pc_metrics_events_dropped_total``) rather than
piling up in memory and lagging ever further. The same thread samples the queue depth and the
engine's health once a second by the clock, between rounds, so those gauges stay current under
load and move when no batch runs.

``pb_utils`` is passed in rather than imported: ``MetricFamily`` exists on the module only once
the stub has initialized, and passing it keeps this module importable (and testable) outside Triton.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Callable, Iterable, Sequence

import numpy as np

from core.engine import BatchStats, ClassificationEngine, DocumentScores
from patent_classifier_client.errors import ErrorKind
from patent_classifier_client.feedback_protocol import VERDICTS
from server.prediction_records import RecorderStats

log = logging.getLogger("patent_classifier.metrics")

# Seconds: sub-millisecond CPU queues up to a 9B model's minute-long backlog.
DURATION_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
TOKEN_BUCKETS = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
RATIO_BUCKETS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
# From a 188-class model's barely-better-than-uniform answers (1/188 ≈ 0.005) to a sure one.
PROBABILITY_BUCKETS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]

SAMPLE_INTERVAL_S = 1.0
# Events waiting for the metrics thread; past this many, new ones are dropped and counted. A
# backlog that long is already far behind the answers (each update is an IPC call): holding more
# would only take memory and make what the series show later still.
MAX_QUEUED_EVENTS = 10_000
EVENTS_PER_ROUND = 1_000  # between two looks at the sampling clock

# (name, kind, help, buckets); kinds are pb_utils.MetricFamily attribute names.
FAMILIES = {
    "pc_requests_total": ("COUNTER", "Classification requests received (each holds one or more documents)", None),
    "pc_requests_succeeded_total": ("COUNTER", "Requests answered with scores", None),
    "pc_requests_failed_total": ("COUNTER", "Requests answered with an error, by err: " + ", ".join(k.value for k in ErrorKind), None),
    "pc_request_duration_seconds": ("HISTOGRAM", "Seconds from execute() receiving a request until its answer is ready to send", DURATION_BUCKETS),
    "pc_request_queue_duration_seconds": ("HISTOGRAM", "Seconds a document waited from submit to the start of its forward pass", DURATION_BUCKETS),
    "pc_tokenization_seconds_total": ("COUNTER", "Seconds spent tokenizing the documents that were computed (divide by pc_documents_total)", None),
    "pc_documents_total": ("COUNTER", "Documents computed in a forward pass", None),
    "pc_documents_truncated_total": ("COUNTER", "Documents longer than max_length, cut before classification", None),
    "pc_predictions_total": ("COUNTER", "Documents whose most likely class was this label", None),
    "pc_batch_documents": ("HISTOGRAM", "Documents per forward pass", SIZE_BUCKETS),
    "pc_batch_tokens": ("HISTOGRAM", "Real (unpadded) tokens per forward pass", TOKEN_BUCKETS),
    "pc_batch_padded_tokens": ("HISTOGRAM", "Tokens a forward pass computed, padding included (width x documents)", TOKEN_BUCKETS),
    "pc_batch_padding_ratio": ("HISTOGRAM", "Share of a forward pass's tokens that were padding", RATIO_BUCKETS),
    "pc_batch_inference_duration_seconds": ("HISTOGRAM", "Seconds of one forward pass (softmax and copy back included)", DURATION_BUCKETS),
    "pc_queue_documents": ("GAUGE", "Documents admitted and waiting (torch engine: for a forward pass; vllm engine: for their answer)", None),
    "pc_queue_tokens": ("GAUGE", "Tokens of the waiting documents (admission refuses past max_queue_tokens)", None),
    "pc_engine_healthy": ("GAUGE", "1 while the model's engine can answer, 0 once it cannot", None),
    "pc_engine_startup_seconds": ("GAUGE", "Seconds the engine took to start: loading the model, compiling, starting its threads", None),
    "pc_engine_cpu_threads": ("GAUGE", "Intra-op CPU threads of the PyTorch engine's forward passes (serving field cpu_threads)", None),
    "pc_engine_info": ("GAUGE", "1, labelled with the dtype the model computes in and the device it runs on (serving fields dtype, device)", None),
    "pc_top_class_probability_ratio": ("HISTOGRAM", "Probability the model gave its most likely class, per answered document", PROBABILITY_BUCKETS),
    "pc_metrics_events_dropped_total": (
        "COUNTER", f"Metric updates dropped because the metrics thread had {MAX_QUEUED_EVENTS} waiting: the pc_ "
        "request, document and batch series undercount by what this counts", None),
}
# Only for a model whose prediction_records is on (server/prediction_records.py).
RECORD_FAMILIES = {
    "pc_prediction_records_written_total": ("COUNTER", "Prediction records the records database committed", None),
    "pc_prediction_record_failures_total": (
        "COUNTER", "Failures on the way to the records database, by stage: journal (records not journaled: the disk "
        "refused them or the journal was at records_journal_max_bytes; lost), database (a write attempt that failed; its "
        "records wait in the journal and are retried), quarantined (records the database refused, or lines that do not "
        "parse: set aside in the quarantine file beside the journal)", None),
    "pc_prediction_records_pending_documents": ("GAUGE", "Prediction records in the journal that the records database does not have yet", None),
    "pc_prediction_journal_bytes": ("GAUGE", "Bytes in the model instance's prediction journal", None),
    "pc_prediction_journal_limit_bytes": ("GAUGE", "records_journal_max_bytes: past it, records of answers are dropped", None),
}

_STOP = object()


class TritonModelMetrics:
    """One model's metrics. ``batch``, ``request_received``, ``answered`` and ``failed`` only queue."""

    def __init__(
        self, pb_utils, model_name: str, label_codes: Sequence[str], engine: ClassificationEngine,
        instance_name: str | None = None, record_stats: Callable[[], RecorderStats | None] = lambda: None,
    ):
        self._engine = engine
        self._record_stats = record_stats
        self._events: queue.Queue = queue.Queue(maxsize=MAX_QUEUED_EVENTS)
        self._dropped = 0  # events refused by the full queue (any thread: under _dropped_lock)
        self._dropped_lock = threading.Lock()
        self._dropped_counted = 0  # of those, what pc_metrics_events_dropped_total has (the metrics thread)
        families = {**FAMILIES, **(RECORD_FAMILIES if record_stats() is not None else {})}
        self._families = {
            name: pb_utils.MetricFamily(name=name, description=help_text, kind=getattr(pb_utils.MetricFamily, kind))
            for name, (kind, help_text, _) in families.items()
        }
        model = {"model": model_name, **({"model_instance": instance_name} if instance_name else {})}

        def metric(name: str, **labels: str):
            buckets = families[name][2]
            extra = {"buckets": buckets} if buckets is not None else {}
            return self._families[name].Metric(labels={**model, **labels}, **extra)

        made_below = ("pc_requests_failed_total", "pc_predictions_total", "pc_engine_cpu_threads", "pc_engine_info",
                      "pc_prediction_record_failures_total")
        self._plain = {name: metric(name) for name in families if name not in made_below}
        # Created up front, at zero, so every error kind and every class exists as a series from the
        # start: rates and shares are then defined before the first occurrence.
        self._failures = {kind: metric("pc_requests_failed_total", err=kind.value) for kind in ErrorKind}
        self._predictions = [metric("pc_predictions_total", label=code) for code in label_codes]
        self._records_seen = RecorderStats()
        if "pc_prediction_record_failures_total" in families:
            self._record_failures = {
                stage: metric("pc_prediction_record_failures_total", stage=stage) for stage in self._records_seen.failures
            }
        self._plain["pc_engine_healthy"].set(1.0 if engine.is_healthy() else 0.0)
        if engine.startup_seconds is not None:  # the engine started before its metrics are made
            self._plain["pc_engine_startup_seconds"].set(engine.startup_seconds)
        if engine.cpu_threads is not None:  # fixed once the engine has started; none for vLLM's own threads
            self._plain["pc_engine_cpu_threads"] = metric("pc_engine_cpu_threads")
            self._plain["pc_engine_cpu_threads"].set(float(engine.cpu_threads))
        # What "auto" resolved to on this machine, readable off the server.
        self._plain["pc_engine_info"] = metric("pc_engine_info", dtype=engine.dtype, device=engine.device)
        self._plain["pc_engine_info"].set(1.0)
        self._thread = threading.Thread(target=self._run, name="triton-metrics", daemon=True)
        self._thread.start()

    # Called from the engine's compute thread, execute() and the answer thread: enqueue only, never wait.
    def batch(self, stats: BatchStats) -> None:
        self._put(("batch", stats))

    def request_received(self) -> None:
        self._put(("received", None))

    def answered(self, scores: Sequence[DocumentScores], seconds: float) -> None:
        self._put(("answered", (scores, seconds)))

    def failed(self, kind: ErrorKind, seconds: float) -> None:
        self._put(("failed", (kind, seconds)))

    def engine_dead(self) -> None:
        """The engine was found dead (server.dead_engine_exit): say so now, not at the next sample."""
        self._engine_healthy(False)

    def stop(self) -> None:
        self._engine_healthy(False)
        try:
            self._events.put(_STOP, timeout=10)  # waits for room: the thread is still taking events
        except queue.Full:
            log.error("the metrics thread took no event for 10 s; stopping without it")
        self._thread.join(timeout=10)

    def _put(self, event: tuple) -> None:
        try:
            self._events.put_nowait(event)
        except queue.Full:
            with self._dropped_lock:
                self._dropped += 1

    def _engine_healthy(self, healthy: bool) -> None:
        self._plain["pc_engine_healthy"].set(1.0 if healthy else 0.0)

    def _run(self) -> None:
        sampled_at = time.monotonic()
        while True:
            events = self._take(max(0.0, sampled_at + SAMPLE_INTERVAL_S - time.monotonic()))
            stopping = _STOP in events
            try:
                self._apply_round([event for event in events if event is not _STOP])
                if time.monotonic() - sampled_at >= SAMPLE_INTERVAL_S:
                    sampled_at = time.monotonic()
                    self._sample()
            except Exception:  # a metric that fails to update must never take serving down
                log.exception("updating metrics failed")
            if stopping:
                return

    def _take(self, wait_s: float) -> list:
        """Up to EVENTS_PER_ROUND queued events: waits up to ``wait_s`` for the first, not for the rest."""
        try:
            events = [self._events.get(timeout=wait_s) if wait_s > 0 else self._events.get_nowait()]
        except queue.Empty:
            return []
        while len(events) < EVENTS_PER_ROUND and events[-1] is not _STOP:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        return events

    def _sample(self) -> None:
        documents, tokens = self._engine.queue_depth()
        self._plain["pc_queue_documents"].set(float(documents))
        self._plain["pc_queue_tokens"].set(float(tokens))
        self._engine_healthy(self._engine.is_healthy())
        records = self._record_stats()
        if records is not None:
            self._apply_record_stats(records)

    def _apply_record_stats(self, records: RecorderStats) -> None:
        # The recorder keeps totals; Triton's counters only increment: add what is new since the last sample.
        seen = self._records_seen
        if records.written > seen.written:
            self._plain["pc_prediction_records_written_total"].increment(float(records.written - seen.written))
        for stage, count in records.failures.items():
            if count > seen.failures[stage]:
                self._record_failures[stage].increment(float(count - seen.failures[stage]))
        self._plain["pc_prediction_records_pending_documents"].set(float(records.pending))
        self._plain["pc_prediction_journal_bytes"].set(float(records.journal_bytes))
        self._plain["pc_prediction_journal_limit_bytes"].set(float(records.journal_limit_bytes))
        self._records_seen = records

    def _apply_round(self, events: list) -> None:
        """One round's events: each counter series incremented once by the round's sum, each
        histogram value observed, the queue gauges set from the round's last batch."""
        plain = self._plain
        counts: collections.Counter = collections.Counter()  # counter series -> amount
        observations: list[tuple[str, float]] = []
        last_batch = None
        for what, payload in events:
            if what == "received":
                counts["pc_requests_total"] += 1
            elif what == "answered":
                scores, seconds = payload
                counts["pc_requests_succeeded_total"] += 1
                observations.append(("pc_request_duration_seconds", seconds))
                counts["pc_documents_truncated_total"] += sum(1 for document in scores if document.truncated)
                for index, count in _top_classes(scores).items():
                    counts[("prediction", index)] += count
                observations += [("pc_top_class_probability_ratio", float(d.probabilities.max())) for d in scores]
            elif what == "failed":
                kind, seconds = payload
                counts[("failure", kind)] += 1
                observations.append(("pc_request_duration_seconds", seconds))
            elif what == "batch":
                stats = last_batch = payload
                counts["pc_documents_total"] += stats.documents
                counts["pc_tokenization_seconds_total"] += stats.tokenize_seconds
                observations += [
                    ("pc_batch_documents", float(stats.documents)), ("pc_batch_tokens", float(stats.real_tokens)),
                    ("pc_batch_padded_tokens", float(stats.padded_tokens)), ("pc_batch_padding_ratio", stats.padding_ratio),
                    ("pc_batch_inference_duration_seconds", stats.compute_seconds),
                    *(("pc_request_queue_duration_seconds", seconds) for seconds in stats.queue_seconds),
                ]
        with self._dropped_lock:
            dropped = self._dropped
        counts["pc_metrics_events_dropped_total"] += dropped - self._dropped_counted
        self._dropped_counted = dropped
        for series, amount in counts.items():
            if amount:
                self._counter(series).increment(float(amount))
        for name, observed in observations:
            plain[name].observe(observed)
        if last_batch is not None:
            plain["pc_queue_documents"].set(float(last_batch.queue_documents))
            plain["pc_queue_tokens"].set(float(last_batch.queue_tokens))

    def _counter(self, series):
        if isinstance(series, str):
            return self._plain[series]
        what, key = series
        return self._predictions[key] if what == "prediction" else self._failures[key]


def _top_classes(scores: Iterable[DocumentScores]) -> collections.Counter:
    return collections.Counter(int(np.argmax(document.probabilities)) for document in scores)


FEEDBACK_FAMILIES = {
    "pc_feedback_total": ("COUNTER", "Examiners' corrections recorded, by model and verdict: correct (the predicted "
                          "top-1 was the right class), wrong", None),
    "pc_live_accuracy_ratio": ("GAUGE", "Share of the model's most recent corrections (up to the feedback model's "
                               "live_accuracy_window) that confirmed its top-1", None),
    "pc_live_accuracy_window_documents": ("GAUGE", "Corrected documents pc_live_accuracy_ratio is computed over "
                                          "(at most live_accuracy_window)", None),
}


class TritonFeedbackMetrics:
    """The feedback model's metrics, labelled with the classifier each correction is about. Updated
    inline: corrections are few, and each is acknowledged only after its database commit anyway."""

    def __init__(self, pb_utils):
        self._families = {
            name: pb_utils.MetricFamily(name=name, description=help_text, kind=getattr(pb_utils.MetricFamily, kind))
            for name, (kind, help_text, _) in FEEDBACK_FAMILIES.items()
        }
        self._series: dict[tuple[str, ...], object] = {}

    def _metric(self, name: str, **labels: str):
        key = (name, *sorted(labels.items()))
        if key not in self._series:
            self._series[key] = self._families[name].Metric(labels=labels)
        return self._series[key]

    def recorded(self, model: str, counts: dict[str, int]) -> None:
        # Both verdicts exist from the model's first sight, at zero, so the accuracy's rate() is defined.
        for verdict in VERDICTS:
            counter = self._metric("pc_feedback_total", model=model, verdict=verdict)
            if counts.get(verdict):
                counter.increment(float(counts[verdict]))

    def live_accuracy(self, accuracy) -> None:
        """``accuracy``: a ``core.prediction_store.LiveAccuracy``."""
        self._metric("pc_live_accuracy_ratio", model=accuracy.model).set(accuracy.accuracy)
        self._metric("pc_live_accuracy_window_documents", model=accuracy.model).set(float(accuracy.corrections))
