"""The model's metrics thread (server/triton_metrics.py) under load, with a stand-in for Triton's
``pb_utils``: its queue is bounded and what it drops is counted, a round of events costs one
update per counter series, and the health and queue gauges are sampled while a backlog is
worked off, not only once it is gone."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from core.engine import DocumentScores, QueueDepth
from patent_classifier_client.errors import ErrorKind
from server import triton_metrics
from server.triton_metrics import TritonModelMetrics
from tests.waiting import wait_until


class FakeMetric:
    def __init__(self, family, labels):
        self.family, self.labels = family, labels
        self.increments, self.observations, self.values = [], [], []

    def increment(self, amount):
        self.family.calls.gate()
        self.increments.append(amount)

    def observe(self, value):
        self.family.calls.gate()
        self.observations.append(value)

    def set(self, value):
        self.family.calls.gate()
        self.values.append(value)


class Calls:
    """Every IPC call of the metrics, counted; ``hold()`` stops the next one until ``release()``."""

    def __init__(self):
        self.count = 0
        self._open = threading.Event()
        self._open.set()
        self.waiting = threading.Event()

    def gate(self):
        self.count += 1
        if not self._open.is_set():
            self.waiting.set()
            self._open.wait()

    def hold(self):
        self.waiting.clear()
        self._open.clear()

    def release(self):
        self._open.set()


class FakePbUtils:
    def __init__(self):
        self.calls = Calls()
        self.families = {}
        outer = self

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, name, description, kind):
                self.name, self.calls, self.metrics = name, outer.calls, []
                outer.families[name] = self

            def Metric(self, labels, buckets=None):
                metric = FakeMetric(self, labels)
                self.metrics.append(metric)
                return metric

        self.MetricFamily = MetricFamily

    def total(self, name, **labels):
        return sum(sum(m.increments) for m in self.families[name].metrics if labels.items() <= m.labels.items())


class FakeEngine:
    startup_seconds, cpu_threads, dtype, device = 1.0, None, "float32", "cpu"

    def __init__(self, backlog=lambda: 0):
        self.backlog, self.sampled_with_backlog = backlog, []

    def queue_depth(self):
        self.sampled_with_backlog.append(self.backlog())
        return QueueDepth(0, 0)

    def is_healthy(self):
        return True


def scores(top: int, labels: int = 4) -> list[DocumentScores]:
    probabilities = np.full(labels, 0.1, np.float32)
    probabilities[top] = 0.7
    return [DocumentScores(probabilities, 10, False)]


@pytest.fixture
def pb_utils():
    return FakePbUtils()


def test_a_full_queue_drops_new_events_without_waiting_and_counts_them(pb_utils, monkeypatch):
    monkeypatch.setattr(triton_metrics, "MAX_QUEUED_EVENTS", 50, raising=False)
    metrics = TritonModelMetrics(pb_utils, "m", ["a", "b", "c", "d"], FakeEngine())
    pb_utils.calls.hold()
    metrics.request_received()
    assert pb_utils.calls.waiting.wait(10)  # the metrics thread is inside an update, stuck
    for _ in range(50 + 30):  # the queue holds 50: 30 are dropped, and none of these calls waits
        metrics.request_received()
    pb_utils.calls.release()
    wait_until(lambda: pb_utils.total("pc_metrics_events_dropped_total") == 30, "the 30 dropped events counted")
    wait_until(lambda: pb_utils.total("pc_requests_total") == 1 + 50, "every queued event applied")
    metrics.stop()


def test_a_round_of_events_costs_one_update_per_counter_series(pb_utils):
    metrics = TritonModelMetrics(pb_utils, "m", ["a", "b", "c", "d"], FakeEngine())
    pb_utils.calls.hold()
    metrics.request_received()
    assert pb_utils.calls.waiting.wait(10)
    for index in range(200):  # queued while the thread is stuck: one round takes them all
        metrics.request_received()
        metrics.answered(scores(index % 2), 0.01)
        metrics.failed(ErrorKind.OVERLOADED, 0.001)
    before = pb_utils.calls.count
    pb_utils.calls.release()
    wait_until(lambda: pb_utils.total("pc_requests_total") == 201, "the round applied")
    metrics.stop()
    assert pb_utils.total("pc_requests_succeeded_total") == 200
    assert pb_utils.total("pc_predictions_total", label="a") == pb_utils.total("pc_predictions_total", label="b") == 100
    assert pb_utils.total("pc_requests_failed_total", err=ErrorKind.OVERLOADED.value) == 200
    for name in ("pc_requests_succeeded_total", "pc_predictions_total", "pc_requests_failed_total"):
        assert all(len(m.increments) <= 1 for m in pb_utils.families[name].metrics)
    # Histograms observe each value: 200 × (a duration and a top-class probability per answer, a
    # duration per failure) = 600 calls. Counters: one per series (5), where one per event would be
    # 800 more; the rest is stop's gauge and the once-a-second samples (3 calls each).
    assert pb_utils.calls.count - before < 600 + 5 + 50


def test_health_and_queue_gauges_are_sampled_while_a_backlog_is_worked_off(pb_utils, monkeypatch):
    monkeypatch.setattr(triton_metrics, "SAMPLE_INTERVAL_S", 3600.0)  # no sample while the backlog builds up
    monkeypatch.setattr(triton_metrics, "EVENTS_PER_ROUND", 10, raising=False)
    holder = {}
    engine = FakeEngine(backlog=lambda: holder["metrics"]._events.qsize())
    metrics = holder["metrics"] = TritonModelMetrics(pb_utils, "m", ["a", "b", "c", "d"], engine)
    pb_utils.calls.hold()
    metrics.request_received()
    assert pb_utils.calls.waiting.wait(10)  # stuck inside that event's update
    for _ in range(100):
        metrics.request_received()
    monkeypatch.setattr(triton_metrics, "SAMPLE_INTERVAL_S", 0.0)  # from now on, a sample is always due
    pb_utils.calls.release()
    wait_until(lambda: pb_utils.total("pc_requests_total") == 101, "the backlog worked off")
    sampled_with_backlog = list(engine.sampled_with_backlog)  # before stop() queues its own event
    metrics.stop()
    assert any(backlog > 0 for backlog in sampled_with_backlog), sampled_with_backlog
