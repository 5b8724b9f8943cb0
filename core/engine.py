"""The engine contract: everything the Triton model, the benchmarks and the tests need from
a classifier backend, and nothing more (after TEI's backend trait and vLLM's runner split).

An engine takes rendered texts, tokenizes them on arrival, batches them with whatever else is
waiting, and completes a ``Future`` per submission. Engines own their threads; callers never
block the engine loop: they attach a callback to the future or wait on it.
"""
from __future__ import annotations

import abc
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np

from patent_classifier_client.errors import ServerUnavailable
from core.labels import LabelSet


@dataclass(frozen=True)
class DocumentScores:
    """One document's answer: a probability per label, and what the model actually read."""

    probabilities: np.ndarray  # float32, shape (num_labels,), sums to 1
    token_count: int  # tokens fed to the model, special tokens included
    truncated: bool  # the text was longer than the model's max length and was cut

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices and probabilities of the k most likely labels, most likely first."""
        # A stable sort on the negated scores keeps ties in label order, so answers are reproducible.
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return order, self.probabilities[order]


def padded_width(longest: int, multiple_of: int) -> int:
    """The width a batch whose longest document has ``longest`` tokens is padded to: the width
    the forward pass computes, so the one every token budget counts."""
    return -(-longest // multiple_of) * multiple_of


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass cost and how the queue looked, for metrics and benchmarks."""

    documents: int
    real_tokens: int  # tokens of the documents themselves
    padded_tokens: int  # what the pass computed: width × documents (= real_tokens when packed)
    queue_seconds: tuple[float, ...]  # per document: from submit to the start of compute
    tokenize_seconds: float  # tokenizing the submissions these documents came from
    compute_seconds: float  # the forward pass, softmax and copy back
    expired: int  # documents dropped from the queue for their deadline before this pass
    cancelled: int  # documents dropped because their request was cancelled
    queue_documents: int  # still waiting after this batch was taken
    queue_tokens: int

    @property
    def padding_ratio(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


BatchObserver = Callable[[BatchStats], None]


class QueueDepth(NamedTuple):
    """What an engine holds that is admitted and not yet computed (the PyTorch engine) or not yet
    answered (the vLLM engine): the quantity admission counts against ``max_queue_tokens``."""

    documents: int
    tokens: int


def complete(future: Future, result: object = None, error: BaseException | None = None) -> bool:
    """Complete ``future`` with ``result`` or ``error`` unless it is already complete; True if this call did.

    The one way an engine completes a request's future. ``Future.set_*`` checks and sets under
    the future's own lock, so when an engine thread, another engine thread and the caller
    (``cancel()``) race, exactly one wins and the others learn it here. Checking ``done()`` first
    and setting after is not safe: two threads can both pass the check, and the second
    ``set_*`` raises inside an engine loop."""
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:
        return False
    return True


def caller_gave_up(future: Future, is_cancelled: Callable[[], bool] | None) -> bool:
    """Whether the caller cancelled: its future, or its probe (for Triton an IPC round trip).

    A probe that raises counts as "not cancelled": the request is then computed, which costs
    a little work, where letting the exception out would kill an engine thread or leave the
    request's future forever incomplete."""
    if future.cancelled():
        return True
    try:
        return bool(is_cancelled and is_cancelled())
    except Exception:
        return False


class ClassificationEngine(abc.ABC):
    """A running classifier. Implementations: ``server.torch_engine.TorchEngine``, ``server.vllm_engine.VllmEngine``."""

    labels: LabelSet
    max_length: int
    # Where the forward passes run ("cpu", "cuda:0") and in what precision ("float32", "bfloat16"),
    # as resolved from the configuration's "auto": known once the engine has started; logged, and
    # exported as the metric pc_engine_info.
    device: str
    dtype: str
    # Seconds start() took: loading the model, compiling, starting the engine's threads.
    startup_seconds: float | None = None
    # Intra-op CPU threads of the forward passes, as the computing thread sees them once started;
    # None where the engine leaves its threads to a library of its own (vLLM).
    cpu_threads: int | None = None

    def __init__(self) -> None:
        self._batch_observers: list[BatchObserver] = []
        self._stopping = False  # set by stop(): no new work is taken from then on

    def _new_submission(self) -> "Future[list[DocumentScores]]":
        """The future for a new submission; already failed when the engine cannot take work."""
        future: Future[list[DocumentScores]] = Future()
        if self._stopping or not self.is_healthy():
            future.set_exception(ServerUnavailable("the engine is not running"))
        return future

    def observe_batches(self, observer: BatchObserver) -> None:
        """Call ``observer`` with the ``BatchStats`` of every forward pass (on the engine's thread: keep it cheap)."""
        self._batch_observers.append(observer)

    def _publish(self, stats: BatchStats) -> None:
        for observer in self._batch_observers:
            observer(stats)

    @abc.abstractmethod
    def start(self) -> None:
        """Load the model and start the engine's threads; raise if that fails."""

    @abc.abstractmethod
    def submit(
        self,
        texts: Sequence[str],
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> "Future[list[DocumentScores]]":
        """Queue texts for classification; the future holds one ``DocumentScores`` per text, in order,
        or a ``patent_classifier_client.errors.ServingError``.

        ``deadline`` is a ``time.monotonic()`` instant: work still queued then is dropped before
        compute and fails with ``DeadlineExceeded``. Work whose future was cancelled, or whose
        ``is_cancelled()`` turns true while queued, is dropped before compute and fails with
        ``Cancelled``. A full queue fails the future at once with ``Overloaded``."""

    @abc.abstractmethod
    def queue_depth(self) -> QueueDepth:
        """Documents and tokens waiting now (cheap: metrics sample it every second)."""

    @abc.abstractmethod
    def is_healthy(self) -> bool:
        """False once the engine can no longer answer (its loop died, its device failed)."""

    @abc.abstractmethod
    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Finish what is queued (up to the timeout), fail the rest, release the model."""
