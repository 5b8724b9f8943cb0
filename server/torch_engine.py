"""The PyTorch engine: a transformers ``*ForSequenceClassification`` model behind one loop.

Callers tokenize on their own thread in ``submit`` (off the model's critical path) and queue
the documents; the engine thread takes batches from the ``TokenBudgetScheduler`` and runs one
forward pass per batch, so documents from different requests share a pass. Each submission's
future completes when its last document is scored.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from core.engine import ClassificationEngine, DocumentScores
from core.errors import EngineFailure, ServerUnavailable
from core.hf_classifier import (
    DocumentEncoder,
    EncodedText,
    load_sequence_classifier,
    pad_batch,
    resolve_device,
    resolve_dtype,
)
from core.labels import LabelSet
from core.serving_config import ServingConfig
from server.scheduler import ScheduledDocument, TokenBudgetScheduler

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Submission:
    future: "Future[list[DocumentScores]]"
    scores: list[DocumentScores | None]
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = len(self.scores)

    def record(self, index: int, scores: DocumentScores) -> None:
        self.scores[index] = scores
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.scores)  # type: ignore[arg-type]

    def fail(self, error: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(frozen=True)
class _QueuedDocument:
    submission: _Submission
    index: int
    encoded: EncodedText


class TorchEngine(ClassificationEngine):
    def __init__(self, config: ServingConfig):
        self.config = config
        self.max_length = config.max_length
        self._device = resolve_device(config.device)
        self._dtype = resolve_dtype(config.dtype, self._device)
        self._scheduler: TokenBudgetScheduler[_QueuedDocument] = TokenBudgetScheduler(
            config.max_batch_tokens, config.max_batch_size, config.max_length
        )
        self._wakeup = threading.Condition()
        self._stopping = False
        self._loop_thread: threading.Thread | None = None
        self._loop_error: BaseException | None = None

    def start(self) -> None:
        self.labels = LabelSet.for_model_dir(self.config.model_dir)
        self._encoder = DocumentEncoder(self.config.model_dir, self.max_length)
        self._model = load_sequence_classifier(self.config.model_dir, self._dtype, self._device)
        if self._model.config.num_labels != len(self.labels):
            raise ValueError(
                f"{self.config.model_dir}: the model has {self._model.config.num_labels} classes but "
                f"{len(self.labels)} labels are listed"
            )
        self._pad_token_id = self._model.config.pad_token_id
        if self._pad_token_id is None:
            self._pad_token_id = self._encoder.tokenizer.pad_token_id
            self._model.config.pad_token_id = self._pad_token_id
        log.info("torch engine: %s on %s in %s", self.config.model_dir, self._device, self._dtype)
        self._loop_thread = threading.Thread(target=self._run_loop, name="torch-engine", daemon=True)
        self._loop_thread.start()

    def submit(self, texts: Sequence[str], deadline: float | None = None) -> "Future[list[DocumentScores]]":
        future: Future[list[DocumentScores]] = Future()
        if self._stopping or not self.is_healthy():
            future.set_exception(ServerUnavailable("the engine is not running"))
            return future
        encoded = self._encoder.encode(texts)
        submission = _Submission(future, [None] * len(encoded))
        with self._wakeup:
            for index, item in enumerate(encoded):
                self._scheduler.add(ScheduledDocument(len(item.token_ids), _QueuedDocument(submission, index, item)))
            self._wakeup.notify()
        return future

    def is_healthy(self) -> bool:
        return self._loop_thread is not None and self._loop_thread.is_alive() and self._loop_error is None

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._loop_thread is not None:
            self._loop_thread.join(drain_timeout_s)
        with self._wakeup:
            leftovers = self._scheduler.next_batch()
            while leftovers:
                for document in leftovers:
                    document.payload.submission.fail(ServerUnavailable("the server shut down before this request ran"))
                leftovers = self._scheduler.next_batch()

    def _run_loop(self) -> None:
        try:
            while True:
                with self._wakeup:
                    while not len(self._scheduler) and not self._stopping:
                        self._wakeup.wait()
                    if not len(self._scheduler):
                        return  # stopping, and everything queued has been answered
                    batch = [d.payload for d in self._scheduler.next_batch() if not d.payload.submission.future.done()]
                if batch:
                    self._run_batch(batch)
        except BaseException as exc:  # the loop must never die silently: callers would hang
            self._loop_error = exc
            log.exception("torch engine loop died")
            raise

    def _run_batch(self, batch: list[_QueuedDocument]) -> None:
        try:
            probabilities = self._forward([document.encoded.token_ids for document in batch])
        except Exception as exc:
            log.exception("forward pass over %d documents failed", len(batch))
            for document in batch:
                document.submission.fail(EngineFailure(f"the model failed on this batch: {type(exc).__name__}: {exc}"))
            return
        for document, row in zip(batch, probabilities):
            document.submission.record(
                document.index, DocumentScores(row, len(document.encoded.token_ids), document.encoded.truncated)
            )

    @torch.inference_mode()
    def _forward(self, sequences: list[list[int]]) -> np.ndarray:
        input_ids, attention_mask = pad_batch(sequences, self._pad_token_id, self._device)
        logits = self._model(input_ids=input_ids, attention_mask=attention_mask).logits
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()
