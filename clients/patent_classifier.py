"""Python client for the patent classifier: the same calls over gRPC and HTTP, sync and asyncio.

    from clients import PatentClassifier
    with PatentClassifier("127.0.0.1:8001", protocol="grpc") as classifier:
        answer = classifier.classify({"ipc": "G06F 16/35", "title": "...", "abstract": "...", "claims": ["1. ..."]})
        print(answer.labels[0].code, answer.labels[0].probability, answer.token_count, answer.truncated)

A document is a ``PatentDocument``, a mapping with its fields (the server renders it with the
template the model was trained on) or a ``str`` of already formatted text. Failures raise the
typed errors of ``core.errors`` (``InvalidInput`` names the field and the limit).

A server with TLS and an access token: ``PatentClassifier(url, tls_ca="ca.pem", token=...)``
(``tls=True`` alone trusts the system's CAs); ``core.access_token.read_token`` reads the token
from a file or ``$PATENT_CLASSIFIER_TOKEN``.
"""
from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Literal, Mapping, Sequence, Union

import numpy as np
from tritonclient.utils import InferenceServerException

from core import access_token, protocol
from core.errors import (
    AccessDenied, DeadlineExceeded, ErrorKind, InvalidInput, ModelNotFound, ServerUnavailable, ServingError,
    error_from_kind,
)
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
    "StatusCode.UNAUTHENTICATED": ErrorKind.ACCESS_DENIED,
    "StatusCode.PERMISSION_DENIED": ErrorKind.ACCESS_DENIED,
}
_HTTP_STATUS = {
    "400": ErrorKind.INVALID_INPUT,
    "401": ErrorKind.ACCESS_DENIED,
    "403": ErrorKind.ACCESS_DENIED,
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
    if access_token.is_refusal(message):  # Triton refuses a missing token with gRPC UNAVAILABLE
        return AccessDenied(f"the server requires an access token (--token-file or ${access_token.TOKEN_ENV}); {message}")
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
    def __init__(
        self, url: str | None, protocol: Protocol, model: str, timeout_s: float, asynchronous: bool,
        tls: bool, tls_ca: str | Path | None, token: str | None,
    ):
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.timeout_s = timeout_s
        self._types, client_module = _transport(protocol, asynchronous)
        self._headers = access_token.request_headers(token, protocol)
        self._client = client_module.InferenceServerClient(
            self.url, **self._connection_timeouts(asynchronous), **self._tls_options(asynchronous, tls or tls_ca is not None, tls_ca)
        )
        self._batched: bool | None = None  # learnt from the model's configuration on first use

    def _tls_options(self, asynchronous: bool, tls: bool, tls_ca: str | Path | None) -> dict:
        """TLS with the server verified against ``tls_ca`` (or the system's CAs), in each transport's own words."""
        if not tls:
            return {}
        ca = str(tls_ca) if tls_ca is not None else None
        if self.protocol == "grpc":
            return {"ssl": True, "root_certificates": ca}
        if asynchronous:
            return {"ssl": True, "ssl_context": ssl.create_default_context(cafile=ca)}
        return {"ssl": True, "ssl_options": {"ca_certs": ca} if ca else {}}

    def _request(self, documents: Sequence[Document], top_k: int | None, batched: bool) -> tuple[list, list]:
        name, elements = _encode_documents(documents)
        # A model whose config.pbtxt lets Triton batch (max_batch_size > 0) takes a leading batch
        # dimension; ours leaves it off (the engine batches), the dynamic-batcher baseline has it.
        lead = [1] if batched else []
        inputs = [self._types.InferInput(name, lead + [len(elements)], "BYTES")]
        inputs[0].set_data_from_numpy(elements.reshape(lead + [len(elements)]))
        if top_k is not None:
            inputs.append(self._types.InferInput(protocol.TOP_K, lead + [1], "INT32"))
            inputs[-1].set_data_from_numpy(np.array([top_k], dtype=np.int32).reshape(lead + [1]))
        outputs = [self._types.InferRequestedOutput(name) for name, _, _ in protocol.OUTPUT_TENSORS]
        return inputs, outputs

    @staticmethod
    def _has_batch_dimension(model_config) -> bool:
        config = model_config.get("config", model_config) if isinstance(model_config, dict) else model_config.config
        value = config.get("max_batch_size", 0) if isinstance(config, dict) else config.max_batch_size
        return int(value) > 0

    def _connection_timeouts(self, asynchronous: bool) -> dict:
        if self.protocol == "grpc":
            return {}
        if asynchronous:
            return {"conn_timeout": self.timeout_s}
        return {"connection_timeout": self.timeout_s, "network_timeout": self.timeout_s}

    def _timeout_kwargs(self) -> dict:
        # "timeout" (microseconds) travels with the request: the server drops the work if it is
        # still queued by then. gRPC also gets a call deadline; HTTP's timeouts are on the client.
        request_timeout = {"timeout": int(self.timeout_s * 1e6)}
        return {**request_timeout, "client_timeout": self.timeout_s} if self.protocol == "grpc" else request_timeout

    def _not_loaded(self, error: ModelNotFound, repository_index) -> ServingError:
        """Triton answers "unknown model" alike for a name it never had and for a model of its
        repository that is not loaded right now (the watchdog reloading it, say). The repository
        index tells them apart: the second is a server unavailable for a while, worth a retry."""
        if not isinstance(repository_index, list):  # gRPC's as_json form
            repository_index = repository_index.get("models", [])
        for entry in repository_index:
            if entry.get("name") == self.model and entry.get("state", "READY") != "READY":
                reason = f": {entry['reason']}" if entry.get("reason") else ""
                return ServerUnavailable(
                    f"model {self.model!r} is in the server's repository but not loaded (state {entry['state']}{reason}); "
                    "it may be reloading: retry"
                )
        return error

    def _repository_index_kwargs(self) -> dict:
        return {"headers": self._headers, **({"as_json": True} if self.protocol == "grpc" else {})}

    @staticmethod
    def _answers(result, batched: bool) -> list[protocol.Classification]:
        tensors = {name: result.as_numpy(name) for name, _, _ in protocol.OUTPUT_TENSORS}
        return protocol.decode_answer({name: value[0] if batched else value for name, value in tensors.items()})


class PatentClassifier(_ClassifierBase):
    """Blocking client. Thread-safe for concurrent calls over gRPC; use one per thread over HTTP."""

    def __init__(
        self, url: str | None = None, protocol: Protocol = "grpc", model: str = DEFAULT_MODEL, timeout_s: float = 60.0,
        *, tls: bool = False, tls_ca: str | Path | None = None, token: str | None = None,
    ):
        super().__init__(url, protocol, model, timeout_s, False, tls, tls_ca, token)

    def classify(self, document: Document, top_k: int | None = None) -> protocol.Classification:
        return self.classify_batch([document], top_k)[0]

    def classify_batch(self, documents: Sequence[Document], top_k: int | None = None) -> list[protocol.Classification]:
        try:
            if self._batched is None:
                self._batched = self._has_batch_dimension(self._client.get_model_config(self.model, headers=self._headers))
            inputs, outputs = self._request(documents, top_k, self._batched)
            result = self._client.infer(self.model, inputs, outputs=outputs, headers=self._headers, **self._timeout_kwargs())
        except InferenceServerException as exc:
            error = typed_error(exc)
            if isinstance(error, ModelNotFound):
                error = self._not_loaded(error, self._repository_index())
            raise error from None
        except TimeoutError:  # the HTTP transport's own timeout: no answer within timeout_s
            raise DeadlineExceeded(f"no answer from {self.url} within {self.timeout_s} s") from None
        except (OSError, http.client.HTTPException) as exc:  # the HTTP transport's socket and protocol errors
            raise ServerUnavailable(f"server unreachable at {self.url}: {type(exc).__name__} {exc}") from None
        return self._answers(result, self._batched)

    def _repository_index(self) -> list | dict:
        try:
            return self._client.get_model_repository_index(**self._repository_index_kwargs())
        except (InferenceServerException, OSError, http.client.HTTPException):
            return []  # the index is only a hint: without it the error stands as reported

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready() and self._client.is_model_ready(self.model))
        except (InferenceServerException, OSError, http.client.HTTPException):
            return False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "PatentClassifier":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncPatentClassifier(_ClassifierBase):
    """asyncio client: ``await classifier.classify(...)``; many calls may be in flight at once."""

    def __init__(
        self, url: str | None = None, protocol: Protocol = "grpc", model: str = DEFAULT_MODEL, timeout_s: float = 60.0,
        *, tls: bool = False, tls_ca: str | Path | None = None, token: str | None = None,
    ):
        super().__init__(url, protocol, model, timeout_s, True, tls, tls_ca, token)

    async def classify(self, document: Document, top_k: int | None = None) -> protocol.Classification:
        return (await self.classify_batch([document], top_k))[0]

    async def classify_batch(self, documents: Sequence[Document], top_k: int | None = None) -> list[protocol.Classification]:
        try:
            if self._batched is None:
                self._batched = self._has_batch_dimension(await self._client.get_model_config(self.model, headers=self._headers))
            inputs, outputs = self._request(documents, top_k, self._batched)
            result = await self._client.infer(self.model, inputs, outputs=outputs, headers=self._headers, **self._timeout_kwargs())
        except InferenceServerException as exc:
            error = typed_error(exc)
            if isinstance(error, ModelNotFound):
                error = self._not_loaded(error, await self._repository_index())
            raise error from None
        except TimeoutError:  # aiohttp's total timeout: no answer within timeout_s
            raise DeadlineExceeded(f"no answer from {self.url} within {self.timeout_s} s") from None
        except OSError as exc:  # aiohttp's connection errors are OSErrors too
            raise ServerUnavailable(f"server unreachable at {self.url}: {exc}") from None
        return self._answers(result, self._batched)

    async def _repository_index(self) -> list | dict:
        try:
            return await self._client.get_model_repository_index(**self._repository_index_kwargs())
        except (InferenceServerException, ConnectionError, OSError):
            return []

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
