"""Load against a classifier, bounded in requests and in time: closed loop and open loop.

A *sender* is a coroutine function that sends one request (a list of documents) and returns
the tokens the classifier read; it raises ``patent_classifier_client.errors.ServingError`` when the request fails.
``classifier_sender`` makes one for our server (gRPC or HTTP); ``benchmarks.peers`` makes them
for the peers (transformers in this process, ``vllm serve``), so every configuration is driven
by the same loops and measured the same way.

Closed loop: ``concurrency`` clients each send one request, wait for its answer and send the
next; the offered load adapts to the server, so samples/s at a given concurrency is the
server's throughput at that queue depth. Open loop: requests arrive at ``rate`` per second
with exponential gaps (a Poisson process), whether or not earlier ones are answered, the way
independent users arrive; latency then shows queueing that a closed loop hides.

Both stop sending after ``max_requests`` or ``max_seconds``, whichever comes first; requests
still in flight then are waited for (up to ``drain_seconds`` in the open loop, whose backlog can
grow without bound) and the rest count as failures.
"""
from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import AsyncIterator, Awaitable, Callable, Literal, Sequence

import numpy as np

from patent_classifier_client.patent_classifier import AsyncPatentClassifier, Document
from patent_classifier_client.errors import ServingError

Sender = Callable[[Sequence[Document]], Awaitable[int]]


@dataclass(frozen=True)
class LoadResult:
    label: str
    concurrency: int  # closed loop: clients; open loop: the most requests that were in flight at once
    requests: int
    documents: int
    failures: int
    tokens: int
    seconds: float
    latencies_s: tuple[float, ...]
    mode: Literal["closed", "open"] = "closed"
    arrival_rate: float | None = None  # open loop: requests offered per second

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


class _Tally:
    """What the loops count, and the progress bar that shows it (over the time bound, which usually ends a run)."""

    def __init__(self, label: str, max_seconds: float, progress: bool):
        from tqdm import tqdm

        self.latencies: list[float] = []
        self.failures = self.documents = self.tokens = 0
        self.started = time.perf_counter()
        self.bar = tqdm(total=max_seconds, desc=label, disable=not progress, file=sys.stderr, leave=False,
                        bar_format="{desc}: {bar} {elapsed} of " + f"{max_seconds:.0f} s" + "{postfix}")

    async def send(self, send: Sender, documents: Sequence[Document]) -> None:
        sent = time.perf_counter()
        try:
            tokens = await send(documents)
        except ServingError:
            self.failures += 1
        else:
            self.latencies.append(time.perf_counter() - sent)
            self.documents += len(documents)
            self.tokens += tokens
        self.bar.set_postfix_str(f"{len(self.latencies)} answered, {self.failures} failed", refresh=False)
        elapsed = time.perf_counter() - self.started
        self.bar.update(min(elapsed, self.bar.total if self.bar.total is not None else elapsed) - self.bar.n)  # tqdm: inf is None

    def result(self, label: str, concurrency: int, seconds: float, **extra) -> LoadResult:
        self.bar.close()
        return LoadResult(label, concurrency, len(self.latencies) + self.failures, self.documents, self.failures,
                          self.tokens, seconds, tuple(self.latencies), **extra)


async def run_closed_loop(
    label: str,
    send: Sender,
    requests: Sequence[Sequence[Document]],
    concurrency: int,
    max_seconds: float,
    max_requests: int | None = None,
    progress: bool = False,
) -> LoadResult:
    """``max_requests`` (default: ``len(requests)``) requests taken from ``requests`` in turn, ``concurrency`` in flight."""
    total = len(requests) if max_requests is None else max_requests
    tally = _Tally(label, max_seconds, progress)
    next_index = 0
    started = tally.started
    stop_at = started + max_seconds

    async def client() -> None:
        nonlocal next_index
        while next_index < total and time.perf_counter() < stop_at:
            index, next_index = next_index, next_index + 1
            await tally.send(send, requests[index % len(requests)])

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return tally.result(label, concurrency, time.perf_counter() - started)


async def run_open_loop(
    label: str,
    send: Sender,
    requests: Sequence[Sequence[Document]],
    rate: float,
    max_seconds: float,
    max_requests: int | None = None,
    drain_seconds: float = 30.0,
    seed: int = 0,
    progress: bool = False,
) -> LoadResult:
    """Requests arrive as a Poisson process of ``rate`` per second; see the module's docstring for the bounds."""
    total = len(requests) if max_requests is None else max_requests
    tally = _Tally(label, max_seconds, progress)
    gaps = random.Random(seed)
    in_flight: set[asyncio.Task] = set()
    sent: list[asyncio.Task] = []
    most_in_flight = 0
    started = tally.started
    stop_at = started + max_seconds
    next_arrival = started
    for index in range(total):
        next_arrival += gaps.expovariate(rate)
        if next_arrival >= stop_at:
            break
        await asyncio.sleep(max(0.0, next_arrival - time.perf_counter()))
        task = asyncio.create_task(tally.send(send, requests[index % len(requests)]))
        sent.append(task)
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        most_in_flight = max(most_in_flight, len(in_flight))
    if in_flight:
        _, unfinished = await asyncio.wait(set(in_flight), timeout=drain_seconds)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        tally.failures += len(unfinished)
    # A sender's bug (anything but a ServingError) must stop the run, as it does the closed loop.
    # Every task's exception is read, so none is left to be logged when the task is collected.
    errors = [task.exception() for task in sent if not task.cancelled()]
    if any(errors):
        raise next(error for error in errors if error is not None)
    return tally.result(label, most_in_flight, time.perf_counter() - started, mode="open", arrival_rate=rate)


@asynccontextmanager
async def classifier_sender(url: str, protocol: str, model: str, timeout_s: float = 120.0) -> AsyncIterator[Sender]:
    """A sender for our server: one KServe request per call, through the project's asyncio client."""
    async with AsyncPatentClassifier(url, protocol=protocol, model=model, timeout_s=timeout_s) as client:

        async def send(documents: Sequence[Document]) -> int:
            answers = await client.classify_batch(documents)
            return sum(answer.token_count for answer in answers)

        yield send


def closed_loop(
    label: str,
    url: str,
    model: str,
    requests: Sequence[Sequence[Document]],
    concurrency: int,
    protocol: str = "grpc",
    max_seconds: float = 120.0,
) -> LoadResult:
    """Send ``requests`` (each a list of documents) to our server with ``concurrency`` in flight; stops by itself
    (``max_seconds`` may be ``math.inf``: it then stops once every request is answered, each within 60 s or more)."""

    async def run() -> LoadResult:
        async with classifier_sender(url, protocol, model, timeout_s=max(60.0, max_seconds) if math.isfinite(max_seconds) else 60.0) as send:
            return await run_closed_loop(label, send, requests, concurrency, max_seconds)

    return asyncio.run(run())
