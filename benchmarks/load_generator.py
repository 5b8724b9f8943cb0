"""Closed-loop load against a running classifier server, bounded in requests and in time.

``concurrency`` clients each send one request, wait for its answer, and send the next, until
``max_requests`` have been sent or ``max_seconds`` have passed: the offered load adapts to the
server, so samples/s at a given concurrency is the server's throughput at that queue depth.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from clients.patent_classifier import AsyncPatentClassifier, Document
from core.errors import ServingError


@dataclass(frozen=True)
class LoadResult:
    label: str
    concurrency: int
    requests: int
    documents: int
    failures: int
    tokens: int
    seconds: float
    latencies_s: tuple[float, ...]

    @property
    def samples_per_second(self) -> float:
        return self.documents / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def latency_percentile_ms(self, percentile: float) -> float:
        return float(np.percentile(np.array(self.latencies_s), percentile) * 1000) if self.latencies_s else float("nan")

    def summary(self) -> dict:
        row = {key: value for key, value in asdict(self).items() if key != "latencies_s"}
        row.update(
            samples_per_second=round(self.samples_per_second, 3),
            tokens_per_second=round(self.tokens_per_second, 1),
            p50_ms=round(self.latency_percentile_ms(50), 1),
            p95_ms=round(self.latency_percentile_ms(95), 1),
            p99_ms=round(self.latency_percentile_ms(99), 1),
        )
        return row


async def _closed_loop(
    url: str, protocol: str, model: str, requests: Sequence[Sequence[Document]], concurrency: int, max_seconds: float
) -> tuple[list[float], int, int, int, float]:
    latencies: list[float] = []
    failures = documents = tokens = 0
    next_request = itertools.count()
    started = time.perf_counter()
    stop_at = started + max_seconds

    async with AsyncPatentClassifier(url, protocol=protocol, model=model, timeout_s=max(60.0, max_seconds)) as client:

        async def worker() -> None:
            nonlocal failures, documents, tokens
            while time.perf_counter() < stop_at and (index := next(next_request)) < len(requests):
                sent = time.perf_counter()
                try:
                    answers = await client.classify_batch(requests[index])
                except ServingError:
                    failures += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                documents += len(answers)
                tokens += sum(answer.token_count for answer in answers)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failures, documents, tokens, time.perf_counter() - started


def closed_loop(
    label: str,
    url: str,
    model: str,
    requests: Sequence[Sequence[Document]],
    concurrency: int,
    protocol: str = "grpc",
    max_seconds: float = 120.0,
) -> LoadResult:
    """Send ``requests`` (each a list of documents) with ``concurrency`` in flight; stops by itself."""
    latencies, failures, documents, tokens, seconds = asyncio.run(
        _closed_loop(url, protocol, model, requests, concurrency, max_seconds)
    )
    return LoadResult(label, concurrency, len(latencies) + failures, documents, failures, tokens, seconds, tuple(latencies))
