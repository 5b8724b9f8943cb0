"""The feedback model's work: examiners' corrections of recorded predictions, checked, committed to
the records database before they are acknowledged, and turned into the feedback metrics.

A correction can arrive a moment after its classification answer, while the prediction's record
is still on its way from the classifier's journal to the database (server/prediction_records.py).
Prediction ids carry the time they were minted, so an id minted within ``pending_wait_s`` that is
not stored yet is waited for, up to then; any other unknown id fails at once.
"""
from __future__ import annotations

import logging
import time

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from core.errors import ServerUnavailable
from core.feedback_protocol import VERDICTS, Correction, decode_corrections, encode_verdicts
from core.prediction_id import minted_at
from core.prediction_store import PredictionStore
from core.serving_config import FeedbackConfig

log = logging.getLogger("patent_classifier.feedback")

POLL_INTERVAL_S = 0.05


class FeedbackService:
    def __init__(self, config: FeedbackConfig, metrics=None):
        """``metrics``: a ``server.triton_metrics.TritonFeedbackMetrics``, or None."""
        self.config = config
        self.metrics = metrics
        self.store = PredictionStore.prepared(config.records_database)
        for model in self.store.recording_models():
            self._publish(model)

    def submit(self, inputs: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
        """Record one request's corrections, all or none; the output tensors once they are committed."""
        corrections = decode_corrections(inputs)
        try:
            self._wait_for_recent_records(corrections)
            recorded = self.store.record_corrections(corrections)
        except SQLAlchemyError as error:
            log.warning("recording corrections failed: %s", error)
            raise ServerUnavailable(f"the records database cannot take corrections now; retry: {type(error).__name__}") from None
        new = [correction for correction in recorded if not correction.repeated]
        for model in sorted({correction.model for correction in new}):
            counts = {verdict: sum(1 for c in new if c.model == model and c.verdict == verdict) for verdict in VERDICTS}
            self._publish(model, counts)
        return encode_verdicts([correction.verdict for correction in recorded])

    def _wait_for_recent_records(self, corrections: list[Correction]) -> None:
        missing = {c.prediction_id for c in corrections} - self.store.stored_prediction_ids([c.prediction_id for c in corrections])
        until = max((minted_at(prediction_id) + self.config.pending_wait_s for prediction_id in missing), default=0.0)
        while missing and time.time() < until:
            time.sleep(POLL_INTERVAL_S)
            missing -= self.store.stored_prediction_ids(list(missing))

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
