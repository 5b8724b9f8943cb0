"""Many documents through the server: batched into requests, several requests in flight, answers
in input order, streamed. Shared by ``python -m patent_classifier_client classify`` and ``python -m patent_classifier_client evaluate``.

A document that cannot be answered gets its typed error in its place; the others are answered.
"""
from __future__ import annotations

import collections
import itertools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar, Union

from patent_classifier_client.errors import InvalidInput, ServingError
from patent_classifier_client.protocol import Classification
from patent_classifier_client.patent_classifier import DEFAULT_MODEL, Document, PatentClassifier, Protocol

Answer = Union[Classification, ServingError]
Key = TypeVar("Key")  # what the caller pairs each document with (its line, its index)
T = TypeVar("T")  # what is sent: a document, a correction
R = TypeVar("R")  # what comes back for it


@dataclass(frozen=True)
class ServerAddress:
    url: str  # host:port, or several replicas: a:8001,b:8001 or dns:///name:port (clients/patent_classifier_client/replicas.py)
    protocol: Protocol = "grpc"
    model: str = DEFAULT_MODEL
    timeout_s: float = 120.0
    tls: bool = False  # verify the server against the system's CAs (or tls_ca)
    tls_ca: Path | None = None
    token: str | None = None

    def connect(self) -> PatentClassifier:
        return PatentClassifier(
            self.url, self.protocol, self.model, self.timeout_s, tls=self.tls, tls_ca=self.tls_ca, token=self.token
        )


def classify_in_batches(
    items: Iterable[tuple[Key, Document | ServingError]],
    server: ServerAddress,
    top_k: int | None = None,
    batch_size: int = 8,
    concurrency: int = 4,
) -> Iterator[list[tuple[Key, Answer]]]:
    """Yield (key, answer) batch by batch, in input order (so a caller can stream, show progress and
    write as it goes). ``items`` are read lazily: a file of millions of patents is never held whole,
    and at most ``2 * concurrency`` batches are in flight or waiting to be yielded.

    An item whose document is already a ``ServingError`` (a line that could not be read) is passed through.
    """
    return in_batches(
        items, server, lambda client, documents: client.classify_batch(documents, top_k),
        lambda client, document: client.classify(document, top_k), batch_size, concurrency,
    )


def in_batches(
    items: Iterable[tuple[Key, T | ServingError]],
    server: ServerAddress,
    send_batch: Callable[[PatentClassifier, list[T]], list[R]],
    send_one: Callable[[PatentClassifier, T], R],
    batch_size: int,
    concurrency: int,
) -> Iterator[list[tuple[Key, R | ServingError]]]:
    """Items sent ``batch_size`` a request, ``concurrency`` requests at a time, outcomes yielded batch
    by batch in input order, ``items`` read lazily. A request succeeds or fails whole, so a batch
    that one bad item fails (``InvalidInput``) is resent one by one, and the others get through; an
    item that is already a ``ServingError`` is passed through; any other error answers its batch."""
    if batch_size < 1 or concurrency < 1:
        raise InvalidInput("batch_size/concurrency", f"must be at least 1, got {batch_size}/{concurrency}")
    # HTTP clients must not be shared between threads, so each worker thread keeps its own; all
    # are closed when the run ends, or their connections would outlive it in a long-lived caller.
    local, opened, opening = threading.local(), [], threading.Lock()

    def client() -> PatentClassifier:
        if not hasattr(local, "client"):
            local.client = server.connect()
            with opening:
                opened.append(local.client)
        return local.client

    def send_alone(item: T | ServingError) -> R | ServingError:
        if isinstance(item, ServingError):
            return item
        try:
            return send_one(client(), item)
        except ServingError as error:
            return error

    def send(batch: list[tuple[Key, T | ServingError]]) -> list[tuple[Key, R | ServingError]]:
        keys, payloads = [key for key, _ in batch], [item for _, item in batch]
        if any(isinstance(item, ServingError) for item in payloads):
            return list(zip(keys, map(send_alone, payloads)))
        try:
            return list(zip(keys, send_batch(client(), payloads)))
        except InvalidInput:
            return list(zip(keys, map(send_alone, payloads)))
        except ServingError as error:
            return [(key, error) for key in keys]

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            in_flight: collections.deque[Future] = collections.deque()
            try:
                for batch in _batches(items, batch_size):
                    in_flight.append(pool.submit(send, batch))
                    while in_flight and (in_flight[0].done() or len(in_flight) > 2 * concurrency):
                        yield in_flight.popleft().result()
                while in_flight:
                    yield in_flight.popleft().result()
            finally:  # the caller stopped early: drop what has not started
                for future in in_flight:
                    future.cancel()
    finally:  # the pool has shut down, so no worker uses its client any more
        for each in opened:
            each.close()


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch
