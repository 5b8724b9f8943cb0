"""Python client for the patent classifier: the same calls over gRPC and HTTP, sync and asyncio.

    from clients import PatentClassifier
    with PatentClassifier("127.0.0.1:8001", protocol="grpc") as classifier:
        answer = classifier.classify({"ipc": "G06F 16/35", "title": "...", "abstract": "...", "claims": ["1. ..."]})
        print(answer.labels[0].code, answer.labels[0].probability, answer.token_count, answer.truncated)

A document is a ``PatentDocument``, a mapping with its fields (the server renders it with the
template the model was trained on) or a ``str`` of already formatted text. Failures raise the
typed errors of ``core.errors`` (``InvalidInput`` names the field and the limit).
"""
from __future__ import annotations

import json
from typing import Literal, Mapping, Sequence, Union

import numpy as np
from tritonclient.utils import InferenceServerException

from core import protocol
from core.errors import ErrorKind, InvalidInput, ServerUnavailable, ServingError, error_from_kind
from core.patent_document import PatentDocument

Document = Union[PatentDocument, Mapping, str]
Protocol = Literal["grpc", "http"]
DEFAULT_MODEL = "kscst-gemma2"
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}

# The one mapping from transport status to our error kinds (the server's side is in model.py).
_GRPC_STATUS = {
    "StatusCode.INVALID_ARGUMENT": ErrorKind.INVALID_INPUT,
    "StatusCode.NOT_FOUND": ErrorKind.MODEL_NOT_FOUND,
    "StatusCode.UNAVAILABLE": ErrorKind.UNAVAILABLE,
    "StatusCode.RESOURCE_EXHAUSTED": ErrorKind.OVERLOADED,
    "StatusCode.DEADLINE_EXCEEDED": ErrorKind.DEADLINE_EXCEEDED,
    "StatusCode.CANCELLED": ErrorKind.CANCELLED,
    "StatusCode.INTERNAL": ErrorKind.ENGINE_FAILURE,
}
_HTTP_STATUS = {
    "400": ErrorKind.INVALID_INPUT,
    "404": ErrorKind.MODEL_NOT_FOUND,
    "429": ErrorKind.OVERLOADED,
    "499": ErrorKind.CANCELLED,
    "500": ErrorKind.ENGINE_FAILURE,
    "503": ErrorKind.UNAVAILABLE,
    "504": ErrorKind.DEADLINE_EXCEEDED,
}


def typed_error(exc: InferenceServerException) -> ServingError:
    status, message = str(exc.status()), exc.message() or str(exc)
    if "unknown model" in message or "is not found" in message:
        return error_from_kind(ErrorKind.MODEL_NOT_FOUND, message)
    kind = _GRPC_STATUS.get(status) or _HTTP_STATUS.get(status)
    if kind is None:  # no status: the server could not be reached
        return ServerUnavailable(f"server unreachable or failed: {message}")
    return error_from_kind(kind, message)


def _transport(protocol_name: Protocol, asynchronous: bool):
    if protocol_name == "grpc":
        import tritonclient.grpc as module

        client_module = module
        if asynchronous:
            import tritonclient.grpc.aio as client_module
    elif protocol_name == "http":
        import tritonclient.http as module

        client_module = module
        if asynchronous:
            import tritonclient.http.aio as client_module
    else:
        raise ValueError(f"protocol: must be 'grpc' or 'http', got {protocol_name!r}")
    return module, client_module


def _encode_documents(documents: Sequence[Document]) -> tuple[str, np.ndarray]:
    if not documents:
        raise InvalidInput("documents", "is empty; send at least 1 document")
    is_text = [isinstance(document, str) for document in documents]
    if any(is_text) and not all(is_text):
        raise InvalidInput("documents", "mixes formatted texts and structured documents; send them in separate calls")
    if all(is_text):
        return protocol.TEXT, np.array([document.encode("utf-8") for document in documents], dtype=np.object_)
    payloads = [
        document.model_dump() if isinstance(document, PatentDocument) else dict(document) for document in documents
    ]
    encoded = [json.dumps(payload, ensure_ascii=False).encode("utf-8") for payload in payloads]
    return protocol.DOCUMENT, np.array(encoded, dtype=np.object_)


class _ClassifierBase:
    def __init__(self, url: str | None, protocol: Protocol, model: str, timeout_s: float, asynchronous: bool):
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.timeout_s = timeout_s
        self._types, client_module = _transport(protocol, asynchronous)
        self._client = client_module.InferenceServerClient(self.url, **self._connection_timeouts(asynchronous))

    def _request(self, documents: Sequence[Document], top_k: int | None) -> tuple[list, list]:
        name, elements = _encode_documents(documents)
        inputs = [self._types.InferInput(name, [len(elements)], "BYTES")]
        inputs[0].set_data_from_numpy(elements)
        if top_k is not None:
            inputs.append(self._types.InferInput(protocol.TOP_K, [1], "INT32"))
            inputs[-1].set_data_from_numpy(np.array([top_k], dtype=np.int32))
        outputs = [self._types.InferRequestedOutput(name) for name, _, _ in protocol.OUTPUT_TENSORS]
        return inputs, outputs

    def _connection_timeouts(self, asynchronous: bool) -> dict:
        if self.protocol == "grpc":
            return {}
        if asynchronous:
            return {"conn_timeout": self.timeout_s}
        return {"connection_timeout": self.timeout_s, "network_timeout": self.timeout_s}

    def _timeout_kwargs(self) -> dict:
        # gRPC takes a per-call deadline in seconds; HTTP's connection timeouts are set on the client.
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    @staticmethod
    def _answers(result) -> list[protocol.Classification]:
        return protocol.decode_answer({name: result.as_numpy(name) for name, _, _ in protocol.OUTPUT_TENSORS})


class PatentClassifier(_ClassifierBase):
    """Blocking client. Thread-safe for concurrent calls over gRPC; use one per thread over HTTP."""

    def __init__(self, url: str | None = None, protocol: Protocol = "grpc", model: str = DEFAULT_MODEL, timeout_s: float = 60.0):
        super().__init__(url, protocol, model, timeout_s, asynchronous=False)

    def classify(self, document: Document, top_k: int | None = None) -> protocol.Classification:
        return self.classify_batch([document], top_k)[0]

    def classify_batch(self, documents: Sequence[Document], top_k: int | None = None) -> list[protocol.Classification]:
        inputs, outputs = self._request(documents, top_k)
        try:
            result = self._client.infer(self.model, inputs, outputs=outputs, **self._timeout_kwargs())
        except InferenceServerException as exc:
            raise typed_error(exc) from None
        except OSError as exc:  # the HTTP transport raises plain socket errors (refused, reset, timed out)
            raise ServerUnavailable(f"server unreachable at {self.url}: {exc}") from None
        return self._answers(result)

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except (InferenceServerException, ConnectionError, OSError):
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "PatentClassifier":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncPatentClassifier(_ClassifierBase):
    """asyncio client: ``await classifier.classify(...)``; many calls may be in flight at once."""

    def __init__(self, url: str | None = None, protocol: Protocol = "grpc", model: str = DEFAULT_MODEL, timeout_s: float = 60.0):
        super().__init__(url, protocol, model, timeout_s, asynchronous=True)

    async def classify(self, document: Document, top_k: int | None = None) -> protocol.Classification:
        return (await self.classify_batch([document], top_k))[0]

    async def classify_batch(self, documents: Sequence[Document], top_k: int | None = None) -> list[protocol.Classification]:
        inputs, outputs = self._request(documents, top_k)
        try:
            result = await self._client.infer(self.model, inputs, outputs=outputs, **self._timeout_kwargs())
        except InferenceServerException as exc:
            raise typed_error(exc) from None
        except OSError as exc:  # aiohttp's connection errors are OSErrors too
            raise ServerUnavailable(f"server unreachable at {self.url}: {exc}") from None
        return self._answers(result)

    async def is_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready() and await self._client.is_model_ready(self.model))
        except (InferenceServerException, ConnectionError, OSError):
            return False

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncPatentClassifier":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
