"""The feedback model's work: examiners' corrections of recorded predictions, checked, committed to
the records database before they are acknowledged, and turned into the feedback metrics.

The model loads without the database: it connects on the first correction, upgrades the schema
once it reaches it, and answers UNAVAILABLE (retryable) for as long as the database is away, then
works again without a reload. Every answer is either permanent (INVALID_ARGUMENT: the same request
will never succeed) or temporary (UNAVAILABLE: retry), never a temporary fault told as permanent.

A correction can arrive while its prediction's record is still on its way from a classifier's
journal to the database (server/prediction_records.py), for a moment or, while a writer backs off
after an outage, for longer. Each records writer keeps a watermark in the database ("every record I
minted before T is stored") and a heartbeat. An unknown id minted before the watermark of every
writer still alive is permanently unknown; one minted after some live writer's watermark may still
arrive: the correction waits for it up to ``pending_wait_s`` by the server's clock (never a time
the client's id claims), then is answered UNAVAILABLE. An id minted after the server's own clock
(beyond ``MAX_CLOCK_SKEW_S``) was minted by no server: refused at once.
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
from sqlalchemy.exc import DataError, SQLAlchemyError

from patent_classifier_client.errors import InvalidInput, ServerUnavailable
from patent_classifier_client.feedback_protocol import PREDICTION_ID, VERDICTS, Correction, decode_corrections, encode_verdicts
from patent_classifier_client.prediction_id import minted_at
from core.prediction_store import WRITER_GONE_AFTER_S, PredictionStore, describe_error
from core.serving_config import FeedbackConfig

log = logging.getLogger("patent_classifier.feedback")

POLL_INTERVAL_S = 0.05
# Clocks of one fleet agree within milliseconds (NTP); a minute is far beyond that, and far short
# of the years a forged id claims.
MAX_CLOCK_SKEW_S = 60.0


class FeedbackService:
    def __init__(self, config: FeedbackConfig, metrics=None):
        """``metrics``: a ``server.triton_metrics.TritonFeedbackMetrics``, or None. Connects to nothing."""
        self.config = config
        self.metrics = metrics
        self.store = PredictionStore(config.records_database, password_file=config.records_password_file)
        self._prepared = False
        self._preparing = threading.Lock()

    def submit(self, inputs: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        """Record one request's corrections, all or none; the output tensors once they are committed."""
        corrections = decode_corrections(inputs)
        _refuse_ids_from_the_future(corrections)
        try:
            self._prepare()
            self._wait_for_records_on_their_way(corrections)
            recorded = self.store.record_corrections(corrections)
        except DataError as error:  # checked before, so never expected: still the request's fault, not the database's
            raise InvalidInput("request", f"the records database refuses these corrections: {describe_error(error)}") from None
        except (SQLAlchemyError, OSError) as error:
            log.warning("recording corrections failed: %s", describe_error(error))
            raise ServerUnavailable(f"the records database cannot take corrections now; retry: {type(error).__name__}") from None
        new = [correction for correction in recorded if not correction.repeated]
        for model in sorted({correction.model for correction in new}):
            counts = {verdict: sum(1 for c in new if c.model == model and c.verdict == verdict) for verdict in VERDICTS}
            self._publish(model, counts)
        return encode_verdicts([correction.verdict for correction in recorded])

    def _prepare(self) -> None:
        """The schema upgraded (the writers may not have reached the database yet) and the metrics of
        every recording model published, once, on the first correction that finds the database."""
        if self._prepared:
            return
        with self._preparing:
            if not self._prepared:
                self.store.upgrade_schema()
                self._prepared = True
                for model in self.store.recording_models():
                    self._publish(model)

    def _wait_for_records_on_their_way(self, corrections: list[Correction]) -> None:
        ids = [c.prediction_id for c in corrections]
        missing = set(ids) - self.store.stored_prediction_ids(ids)
        deadline = time.monotonic() + self.config.pending_wait_s
        while missing:
            on_their_way = self._maybe_on_their_way(missing)
            if not on_their_way:
                return  # permanently unknown: record_corrections names them (INVALID_ARGUMENT)
            if time.monotonic() >= deadline:
                first = min(on_their_way)
                raise ServerUnavailable(
                    f"{PREDICTION_ID}[{ids.index(first)}]: the record of prediction {first} has not reached the records "
                    f"database yet (a classifier's journal still holds records minted since then); retry"
                )
            time.sleep(POLL_INTERVAL_S)
            missing -= self.store.stored_prediction_ids(list(missing))

    def _maybe_on_their_way(self, ids: set[str]) -> set[str]:
        """The ids a live writer may still store: minted at or after its watermark."""
        marks = self.store.writer_marks()
        now_ms = time.time() * 1000
        if not marks:  # no writer has reached the database yet: any recent id may be on its way
            return {i for i in ids if minted_at(i) * 1000 >= now_ms - WRITER_GONE_AFTER_S * 1000}
        newest = max(mark.heartbeat_ms for mark in marks)
        horizon = min(mark.written_through_ms for mark in marks if mark.heartbeat_ms >= newest - WRITER_GONE_AFTER_S * 1000)
        return {i for i in ids if minted_at(i) * 1000 >= horizon}

    def _publish(self, model: str, counts: dict[str, int] | None = None) -> None:
        if self.metrics is None:
            return
        try:  # the corrections are committed: a metric that fails to update must not fail their acknowledgement
            self.metrics.recorded(model, counts or {})
            accuracy = self.store.live_accuracy(model, self.config.live_accuracy_window)
            if accuracy is not None:
                self.metrics.live_accuracy(accuracy)
        except Exception:
            log.exception("updating the feedback metrics of %s failed", model)

    def close(self) -> None:
        self.store.close()


def _refuse_ids_from_the_future(corrections: list[Correction]) -> None:
    latest = time.time() + MAX_CLOCK_SKEW_S
    for index, correction in enumerate(corrections):
        if minted_at(correction.prediction_id) > latest:
            raise InvalidInput(
                f"{PREDICTION_ID}[{index}]", f"{correction.prediction_id} claims to be minted "
                f"{minted_at(correction.prediction_id) - time.time():.0f} s from now; no server minted it",
            )
