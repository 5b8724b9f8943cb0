"""The PyTorch engine: a transformers ``*ForSequenceClassification`` model behind a two-stage loop.

    submit (caller's thread)   reserve the most the documents can take of the queue's bound, or
                               refuse as overloaded before any tokenizing; tokenize; admit into
                               the scheduler at the real token count
    prepare thread             take the next batch from the TokenBudgetScheduler, fail what
                               expired or was cancelled, pad and move the tensors to the device
                               (packed batches: nothing to pad, the token ids go as they are)
    compute thread             forward pass, softmax, hand each document's scores to its request

On the CPU, Gemma-2 computes packed batches (``core.packed_decoder``, serving field
``packing``): documents end to end with no padding, so the scheduler's budget counts their tokens.

A fault inside one forward pass fails that batch's requests and nothing else, unless the device
itself is gone: after a failed pass the engine asks the device for a trivial computation, and
when that fails too (a sticky CUDA error: an illegal address, a device-side assert, a lost GPU)
the engine is dead, as it is when a forward pass runs past ``max_forward_pass_s``: ``is_healthy``
turns false for good and ``server.dead_engine_exit`` ends the stub so the model is reloaded.
Scores that are not finite (a float16 overflow) fail their document; they are never an answer.

The prepare thread builds batch N+1 while the compute thread runs batch N, and holds at most
one prepared batch, so documents are bound to a batch as late as possible (better grouping,
fresher deadline checks). Documents from different requests share a forward pass; each
request's future completes when its last document is scored.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from core import causal_flex_attention
from core.engine import BatchStats, ClassificationEngine, DocumentScores, QueueDepth, caller_gave_up, complete, padded_width
from patent_classifier_client.errors import Cancelled, DeadlineExceeded, EngineFailure, Overloaded, ServerUnavailable
from core.hf_classifier import (
    classifier_logits,
    device_name,
    DocumentEncoder,
    EncodedText,
    load_sequence_classifier,
    pad_batch,
    resolve_device,
    serving_attention,
)
from core.packed_decoder import PackedGemma2, serves_packed
from core.served_precision import PrecisionReport, compute_dtype, quantization, served_precision
from core.serving_config import ServingConfig
from server.cpu_share import engine_cpu_threads, on_a_thread_that_ends
from server.engine_hold import EngineHold
from server.scheduler import ScheduledBatch, ScheduledDocument, TokenBudgetScheduler

log = logging.getLogger(__name__)

# Attention implementations that compile kernels on first use; the engine compiles them at start.
COMPILED_ATTENTION = frozenset({causal_flex_attention.NAME, "flex_attention"})


@dataclass(eq=False)
class _Submission:
    future: "Future[list[DocumentScores]]"
    scores: list[DocumentScores | None]
    submitted_at: float
    tokenize_seconds: float
    deadline: float | None = None
    is_cancelled: Callable[[], bool] | None = None
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.remaining = len(self.scores)

    def record(self, index: int, scores: DocumentScores) -> None:
        """Only the compute thread records, so ``remaining`` needs no lock; the future may still
        have been failed or cancelled meanwhile by another thread, which ``complete`` settles."""
        self.scores[index] = scores
        self.remaining -= 1
        if self.remaining == 0:
            complete(self.future, self.scores)

    def fail(self, error: Exception) -> None:
        complete(self.future, error=error)

    def caller_gave_up(self) -> bool:
        return caller_gave_up(self.future, self.is_cancelled)


@dataclass(frozen=True)
class _QueuedDocument:
    submission: _Submission
    index: int
    encoded: EncodedText


@dataclass
class _PreparedBatch:
    documents: list[_QueuedDocument]
    input_ids: torch.Tensor | None  # None for a packed batch: the documents' token ids are all it needs
    attention_mask: torch.Tensor | None
    scheduled: ScheduledBatch
    cancelled: int


_STOP = object()


def device_computes(device: torch.device) -> bool:
    """After a failed forward pass: whether ``device`` still does a trivial computation. A fault
    that stays (a sticky CUDA error poisons the process's CUDA context: an illegal address, a
    device-side assert, a GPU fallen off the bus) fails this too, and then no later batch can
    succeed; a fault of one batch (out of memory, a bad input) does not."""
    try:
        probe = torch.ones(2, device=device).sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(probe.item()) == 2.0
    except Exception:
        log.exception("the device %s failed a trivial computation", device)
        return False


class TorchEngine(ClassificationEngine):
    def __init__(self, config: ServingConfig):
        super().__init__()
        self.config = config
        self.max_length = config.max_length
        self._device = resolve_device(config.device)
        # int8, bf16 or float32 as the hardware and the export's agreement gate allow (core/served_precision.py).
        self._precision = served_precision(config.dtype, self._device, "torch", PrecisionReport.read(config.model_dir))
        self._dtype = compute_dtype(self._precision)
        self.device, self.dtype = device_name(self._device), self._precision
        self._scheduler: TokenBudgetScheduler[_QueuedDocument] = TokenBudgetScheduler(
            config.max_batch_tokens,
            config.max_batch_size,
            config.max_length,
            max_queue_tokens=config.max_queue_tokens,
            is_dropped=lambda document: document.submission.future.done(),
            width_multiple=config.pad_to_multiple_of,
        )
        self._wakeup = threading.Condition()
        self._prepared: queue.Queue = queue.Queue(maxsize=1)
        self._threads: list[threading.Thread] = []
        self._loop_error: BaseException | None = None
        self._cpu_threads_applied = threading.Event()
        self._hold = EngineHold.from_environment()
        # Admitted and not yet complete: what stop() fails, wherever it is (queued, prepared, computing).
        self._in_flight: set[_Submission] = set()
        self._forward_started: float | None = None  # the forward pass running now, if any (compute thread)
        self._death: str | None = None  # why the engine can no longer answer; set once, never cleared

    def start(self) -> None:
        started = time.monotonic()
        self.labels = self.config.model_labels()
        self._encoder = DocumentEncoder(self.config.model_dir, self.max_length, self.config.preprocessing)
        from transformers import AutoConfig

        attention = serving_attention(AutoConfig.from_pretrained(self.config.model_dir), self._device, self.config.attention)
        on_a_thread_that_ends(lambda: self._load(attention), "engine-load")
        self._scheduler.padded = self._packed is None  # before the first batch is taken: the threads start below
        # On a GPU the forward pass is not the CPU's work, so torch's default stays.
        self._wanted_cpu_threads = engine_cpu_threads(self.config.cpu_threads) if self._device.type == "cpu" else None
        for name, target in (("engine-prepare", self._prepare_loop), ("engine-compute", self._compute_loop)):
            thread = threading.Thread(target=self._guarded(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._cpu_threads_applied.wait()
        self.startup_seconds = time.monotonic() - started
        log.info(
            "torch engine: %s on %s, %s, %s attention, %s batches, %d CPU threads, started in %.1f s",
            self.config.model_dir, self.device, self.dtype, attention, "padded" if self._packed is None else "packed",
            self.cpu_threads, self.startup_seconds,
        )

    def submit(
        self,
        texts: Sequence[str],
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> "Future[list[DocumentScores]]":
        future = self._new_submission()
        if future.done():
            return future
        # Counted at the most it can take (max_length a document, at most the whole bound: a request
        # no queue can hold is still tokenized once, and refused by its real count), so a full queue
        # refuses before tokenizing, whose cost grows with the text and not with max_length.
        reserved = min(len(texts) * self.max_length, self.config.max_queue_tokens)
        with self._wakeup:
            if not self._scheduler.reserve(reserved):
                future.set_exception(Overloaded.queue_full(
                    self._scheduler.waiting_tokens + self._scheduler.reserved_tokens, reserved, self._scheduler.max_queue_tokens
                ))
                return future
        started = time.monotonic()
        try:
            encoded = self._encoder.encode(texts)
        except BaseException:
            with self._wakeup:
                self._scheduler.release(reserved)
            raise
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            with self._wakeup:
                self._scheduler.release(reserved)
            future.set_exception(DeadlineExceeded("the request's deadline passed before it was queued"))
            return future
        submission = _Submission(future, [None] * len(encoded), started, now - started, deadline, is_cancelled)
        documents = [
            ScheduledDocument(len(item.token_ids), _QueuedDocument(submission, index, item), deadline, now)
            for index, item in enumerate(encoded)
        ]
        with self._wakeup:
            if not self._scheduler.admit(documents, reserved=reserved):
                future.set_exception(Overloaded.queue_full(
                    self._scheduler.waiting_tokens, sum(d.token_count for d in documents), self._scheduler.max_queue_tokens
                ))
                return future
            self._in_flight.add(submission)
            self._wakeup.notify()
        future.add_done_callback(lambda _: self._forget(submission))
        return future

    def _forget(self, submission: _Submission) -> None:
        with self._wakeup:  # a reentrant lock: the thread completing a future may hold it already
            self._in_flight.discard(submission)

    def is_healthy(self) -> bool:
        started, limit = self._forward_started, self.config.max_forward_pass_s
        if self._death is None and started is not None and limit and time.monotonic() - started > limit:
            self._die(f"a forward pass has run for more than max_forward_pass_s={limit:g} s")
        return (
            bool(self._threads) and all(t.is_alive() for t in self._threads) and self._loop_error is None
            and self._death is None
        )

    def _die(self, reason: str) -> None:
        """The engine can no longer answer (its device failed or hangs): health turns false for good."""
        if self._death is None:
            self._death = reason
            log.error("torch engine dead: %s", reason)

    def queue_depth(self) -> QueueDepth:
        """Admitted and not yet taken into a batch (what admission counts)."""
        with self._wakeup:
            return QueueDepth(len(self._scheduler), self._scheduler.waiting_tokens)

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        deadline = time.monotonic() + drain_timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._wakeup:
            self._scheduler.drain()
            unfinished = list(self._in_flight)
        # Whatever did not finish within the drain (queued, or held by a loop that died or hangs) fails now.
        reason = f"the engine died ({self._death})" if self._death else "the server shut down before this request ran"
        for submission in unfinished:
            submission.fail(ServerUnavailable(reason))

    def _load(self, attention: str) -> None:
        """Everything torch computes before serving: off the caller's thread (``on_a_thread_that_ends``)."""
        self._model = load_sequence_classifier(self.config.model_dir, self._dtype, self._device, attention,
                                               quantization(self._precision))
        if self._model.config.num_labels != len(self.labels):
            raise ValueError(
                f"{self.config.model_dir}: the model has {self._model.config.num_labels} classes but "
                f"{len(self.labels)} labels are listed"
            )
        self._pad_token_id = self._model.config.pad_token_id
        if self._pad_token_id is None:
            self._pad_token_id = self._encoder.tokenizer.pad_token_id
            self._model.config.pad_token_id = self._pad_token_id
        packs = serves_packed(self.config, self._model.config, self._device)
        self._packed = PackedGemma2(self._model, rows_hint=min(self.config.max_batch_tokens, 1024)) if packs else None
        if attention in COMPILED_ATTENTION:
            self._warm_up()

    def _guarded(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            except BaseException as exc:  # a dead loop must be visible: health turns false
                self._loop_error = exc
                log.exception("engine thread died")
                raise

        return run

    def _prepare_loop(self) -> None:
        while True:
            with self._wakeup:
                while not len(self._scheduler) and not self._stopping:
                    self._wakeup.wait()
            self._hold.wait_while_held(lambda: self._stopping)
            with self._wakeup:
                scheduled = self._scheduler.next_batch(time.monotonic()) if len(self._scheduler) else None
            if scheduled is None:  # stopping, and everything queued has been handed on
                self._prepared.put(_STOP)  # outside the lock: the compute thread may need it to finish
                return
            for document in scheduled.expired:
                document.payload.submission.fail(DeadlineExceeded("the request's deadline passed while it was queued"))
            documents = [document.payload for document in scheduled.documents]
            cancelled = {id(d.submission): d.submission for d in documents if d.submission.caller_gave_up()}
            for submission in cancelled.values():
                submission.fail(Cancelled("the request was cancelled before it was computed"))
            live = [d for d in documents if not d.submission.future.done()]
            if not live:
                continue
            input_ids = attention_mask = None
            if self._packed is None:
                try:
                    input_ids, attention_mask = pad_batch(
                        [d.encoded.token_ids for d in live], self._pad_token_id, self._device, self.config.pad_to_multiple_of
                    )
                except Exception as exc:  # e.g. out of device memory: this batch fails, the engine goes on
                    log.exception("preparing a batch of %d documents failed", len(live))
                    for document in live:
                        document.submission.fail(EngineFailure(f"preparing this batch failed: {type(exc).__name__}: {exc}"))
                    continue
            dropped = len(scheduled.dropped) + len(documents) - len(live)
            self._prepared.put(_PreparedBatch(live, input_ids, attention_mask, scheduled, dropped))

    def _compute_loop(self) -> None:
        # OpenMP keeps the thread count per calling thread, so it is set on the thread that runs the
        # forward passes: it then holds for this engine even beside another one in the same process.
        # Inter-op threads stay as they are: eager forward passes never use that pool, and torch lets
        # a process set its size only once.
        if self._wanted_cpu_threads is not None:
            torch.set_num_threads(self._wanted_cpu_threads)
        self.cpu_threads = torch.get_num_threads()
        self._cpu_threads_applied.set()
        while (batch := self._prepared.get()) is not _STOP:
            self._compute(batch)

    def _compute(self, batch: _PreparedBatch) -> None:
        started = time.monotonic()
        for document in batch.documents:
            if document.submission.deadline is not None and document.submission.deadline <= started:
                document.submission.fail(DeadlineExceeded("the request's deadline passed while it was queued"))
        keep = [row for row, d in enumerate(batch.documents) if not d.submission.future.done()]
        if len(keep) < len(batch.documents):  # expired, cancelled or failed while the batch waited its turn
            batch.documents = [batch.documents[row] for row in keep]
            if batch.input_ids is not None and keep:
                longest = int(batch.attention_mask[keep].sum(dim=1).max())
                width = padded_width(longest, self.config.pad_to_multiple_of)
                batch.input_ids, batch.attention_mask = batch.input_ids[keep, :width], batch.attention_mask[keep, :width]
        if not batch.documents:
            return
        self._forward_started = started
        try:
            with torch.inference_mode():
                logits = self._logits(batch)
                finite = torch.isfinite(logits).all(dim=-1).cpu().numpy()
                probabilities = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        except Exception as exc:
            log.exception("forward pass over %d documents failed", len(batch.documents))
            if not device_computes(self._device):
                self._die(f"the device {self.device} no longer computes after {type(exc).__name__}: {exc}")
            for document in batch.documents:
                document.submission.fail(EngineFailure(f"the model failed on this batch: {type(exc).__name__}: {exc}"))
            return
        finally:
            self._forward_started = None
        # Stats first: whoever is woken by an answer then sees the batch that produced it.
        self._publish_stats(batch, started, time.monotonic() - started)
        for document, row, row_is_finite in zip(batch.documents, probabilities, finite):
            if not row_is_finite:
                log.error("the model's scores for a document of %d tokens are not finite (%s)",
                          len(document.encoded.token_ids), self.dtype)
                document.submission.fail(EngineFailure(
                    f"the model's scores for document {document.index} are not finite (an overflow in {self.dtype}?)"
                ))
                continue
            document.submission.record(
                document.index, DocumentScores(row, len(document.encoded.token_ids), document.encoded.truncated)
            )

    def _publish_stats(self, batch: _PreparedBatch, started: float, compute_seconds: float) -> None:
        if not self._batch_observers:
            return
        queued_documents, queued_tokens = self.queue_depth()
        real_tokens = sum(len(d.encoded.token_ids) for d in batch.documents)
        self._publish(BatchStats(
            documents=len(batch.documents),
            real_tokens=real_tokens,
            padded_tokens=real_tokens if batch.attention_mask is None else int(batch.attention_mask.numel()),
            queue_seconds=tuple(started - d.submission.submitted_at for d in batch.documents),
            tokenize_seconds=sum(d.submission.tokenize_seconds / len(d.submission.scores) for d in batch.documents),
            compute_seconds=compute_seconds,
            expired=len(batch.scheduled.expired),
            cancelled=batch.cancelled,
            queue_documents=queued_documents,
            queue_tokens=queued_tokens,
        ))

    def _warm_up_shapes(self) -> list[tuple[int, int]]:
        """(documents, width) of the forward passes run at start: with dynamic shapes the kernel
        compiles a general graph plus dynamo's specialisations for a batch of one (how many, and none
        after these shapes: benchmarks/results/2026-11-26-attention-parity.md), all paid before the
        model is ready."""
        step = self.config.pad_to_multiple_of
        widest = padded_width(self.max_length, step)
        shapes = [(1, step), (2, 2 * step), (3, 3 * step), (1, widest), (2, widest)]
        return [(min(count, self.config.max_batch_size), min(width, widest)) for count, width in shapes
                if min(count, self.config.max_batch_size) * min(width, widest) <= self.config.max_batch_tokens]

    def _warm_up(self) -> None:
        started = time.monotonic()
        token = (self._pad_token_id + 1) % self._model.config.vocab_size
        for count, width in self._warm_up_shapes():
            self._forward(*pad_batch([[token] * width] * count, self._pad_token_id, self._device))
        log.info("torch engine: attention compiled for every batch shape in %.1f s (%d graphs)",
                 time.monotonic() - started, causal_flex_attention.compiled_graphs())

    def _logits(self, batch: _PreparedBatch) -> torch.Tensor:
        """One row of class logits per document of ``batch``: the one way every batch, packed or
        padded, reaches the model (what a test that stubs the model replaces)."""
        if batch.input_ids is None:
            return self._packed.logits([d.encoded.token_ids for d in batch.documents])  # under inference_mode itself
        return self._forward(batch.input_ids, batch.attention_mask)

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return classifier_logits(self._model, input_ids, attention_mask)
