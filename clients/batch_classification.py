"""Many documents through the server: batched into requests, several requests in flight, answers
in input order. Shared by ``python -m clients classify`` and ``python -m clients evaluate``.

A document that cannot be answered gets its typed error in its place; the others are answered.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

from core.errors import InvalidInput, ServingError
from core.protocol import Classification
from clients.patent_classifier import DEFAULT_MODEL, Document, PatentClassifier, Protocol

Answer = Union[Classification, ServingError]


@dataclass(frozen=True)
class ServerAddress:
    url: str  # host:port
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
    documents: Sequence[Document | ServingError],
    server: ServerAddress,
    top_k: int | None = None,
    batch_size: int = 8,
    concurrency: int = 4,
) -> Iterator[list[Answer]]:
    """Yield the answers batch by batch, in input order (so a caller can stream and show progress).

    An item that is already a ``ServingError`` (a line that could not be read) is passed through.
    """
    if batch_size < 1 or concurrency < 1:
        raise InvalidInput("batch_size/concurrency", f"must be at least 1, got {batch_size}/{concurrency}")
    # HTTP clients must not be shared between threads, so each worker thread keeps its own.
    local = threading.local()

    def client() -> PatentClassifier:
        if not hasattr(local, "client"):
            local.client = server.connect()
        return local.client

    def classify_one(document: Document | ServingError) -> Answer:
        if isinstance(document, ServingError):
            return document
        try:
            return client().classify(document, top_k)
        except ServingError as error:
            return error

    def classify_batch(batch: Sequence[Document | ServingError]) -> list[Answer]:
        if any(isinstance(document, ServingError) for document in batch):
            return [classify_one(document) for document in batch]
        try:
            return list(client().classify_batch(batch, top_k))
        except InvalidInput:
            # One bad document fails its whole request: resend one by one to find it and answer the rest.
            return [classify_one(document) for document in batch]
        except ServingError as error:
            return [error] * len(batch)

    batches = [documents[start : start + batch_size] for start in range(0, len(documents), batch_size)]
    with ThreadPoolExecutor(concurrency) as pool:
        yield from pool.map(classify_batch, batches)  # map keeps input order
