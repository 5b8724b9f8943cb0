"""The engine contract: everything the Triton model, the benchmarks and the tests need from
a classifier backend, and nothing more (after TEI's backend trait and vLLM's runner split).

An engine takes rendered texts, tokenizes them on arrival, batches them with whatever else is
waiting, and completes a ``Future`` per submission. Engines own their threads; callers never
block the engine loop: they attach a callback to the future or wait on it.
"""
from __future__ import annotations

import abc
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Sequence

import numpy as np

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


class ClassificationEngine(abc.ABC):
    """A running classifier. Implementations: ``server.torch_engine.TorchEngine``, ``server.vllm_engine.VllmEngine``."""

    labels: LabelSet
    max_length: int

    @abc.abstractmethod
    def start(self) -> None:
        """Load the model and start the engine's threads; raise if that fails."""

    @abc.abstractmethod
    def submit(self, texts: Sequence[str], deadline: float | None = None) -> "Future[list[DocumentScores]]":
        """Queue texts for classification; the future holds one ``DocumentScores`` per text, in order,
        or a ``core.errors.ServingError``.

        ``deadline`` is a ``time.monotonic()`` instant: work still queued then is dropped before
        compute and fails with ``DeadlineExceeded``. Cancelling the future drops queued work too.
        A full queue fails the future at once with ``Overloaded``."""

    @abc.abstractmethod
    def is_healthy(self) -> bool:
        """False once the engine can no longer answer (its loop died, its device failed)."""

    @abc.abstractmethod
    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Finish what is queued (up to the timeout), fail the rest, release the model."""
