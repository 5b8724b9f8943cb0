"""Python client for the patent classifier: the same calls over gRPC and HTTP, sync and asyncio.

    from patent_classifier_client import PatentClassifier
    with PatentClassifier("127.0.0.1:8001", protocol="grpc") as classifier:
        answer = classifier.classify({"ipc": "G06F 16/35", "title": "...", "abstract": "...", "claims": ["1. ..."]})
        print(answer.labels[0].code, answer.labels[0].probability, answer.token_count, answer.truncated)

A document is a ``PatentDocument``, a mapping with its fields (the server renders it with the
template the model was trained on) or a ``str`` of already formatted text; a mapping may also be a
line of the CLI's files as it is (its "id" is left out, {"text": ...} is formatted text). ``classify_batch``
takes any number of them: it learns the model's limit per request from the model's configuration
(``max_documents_per_request``) once, sends as many requests as needed and answers in order.
Failures raise the typed errors of ``patent_classifier_client.errors`` (``InvalidInput`` names the field and the
limit; ``ServerUnavailable`` says whether nothing listens at the address or it speaks the other
protocol).

Several replicas: ``PatentClassifier("a:8001,b:8001")`` (or a list, or ``dns:///name:8001`` for all
addresses of a name) spreads the calls over them and tries a call that one replica could not
take on another, within its timeout (``patent_classifier_client.replicas`` has the rules).

An examiner's correction of an answer goes back through the same server (its ``feedback`` model,
present when the served models record predictions): ``classifier.submit_feedback(answer.prediction_id,
"KSCST-017", examiner_id="e-42")`` returns the verdict, "correct" or "wrong" (docs/feedback.md).

A server with TLS and an access token: ``PatentClassifier(url, tls_ca="ca.pem", token=...)``
(``tls=True`` alone trusts the system's CAs); ``patent_classifier_client.access_token.read_token`` reads the token
from a file or ``$PATENT_CLASSIFIER_TOKEN``.
"""
from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence, Union

import numpy as np
from tritonclient.utils import InferenceServerException

from patent_classifier_client import replicas
from patent_classifier_client import access_token, feedback_protocol, protocol
from patent_classifier_client.errors import (
    RESTRICTED_API_REFUSAL, AccessDenied, DeadlineExceeded, InvalidInput, ModelNotFound, ServerUnavailable, ServingError,
    error_from_status,
)
from patent_classifier_client.feedback_protocol import FEEDBACK_MODEL, Correction
from patent_classifier_client.patent_document import PatentDocument

Document = Union[PatentDocument, Mapping, str]
Protocol = Literal["grpc", "http"]
DEFAULT_MODEL = "kscst-gemma2"
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
# What model_labels classifies with TOP_K = num_labels: the cheapest text that passes validation.
_ONE_CHARACTER = "."

# What the transports say when the address is wrong (seen with tritonclient 2.73): nothing
# listening is a refused connection; a gRPC client at Triton's HTTP port sees the socket closed or
# no HTTP/2, an HTTP client at the gRPC port an HTTP/2 frame where a status line should be; an
# HTTP client at the metrics port gets Prometheus text where KServe's JSON should be.
_REFUSED = ("Connection refused", "Connect call failed")
_OTHER_PROTOCOL = ("Socket closed", "Failed parsing HTTP/2", "Expected HTTP/", "Bad status line")
_NOT_JSON = ("JSONDecodeError", "while decoding the response")
# The longest part of a transport's own words a message carries: enough to search for, one line.
_DETAIL_CHARACTERS = 200
# A URL as curl and browsers take it: tritonclient takes host:port, so the scheme is taken off
# (and says TLS); one of the other protocol is refused, naming the option that fixes it.
_SCHEMES = {"http://": ("http", False), "https://": ("http", True), "grpc://": ("grpc", False), "grpcs://": ("grpc", True)}
_PROTOCOL_NAMES = {"http": "an HTTP", "grpc": "a gRPC"}


def unreachable(url: str, protocol_name: Protocol, detail: str) -> ServerUnavailable:
    """The server could not be reached: say the likely cause in words a user can act on, in one line."""
    other = "http" if protocol_name == "grpc" else "grpc"
    if any(sign in detail for sign in _REFUSED):
        cause = (f"nothing listens at {url}: is the server running, and is this its {protocol_name} port "
                 f"(default {DEFAULT_URLS[protocol_name]})?")
    elif any(sign in detail for sign in _OTHER_PROTOCOL):
        cause = (f"{url} answers, but not over {protocol_name}: it looks like the server's {other} port; use protocol "
                 f"{other} (--protocol {other}) or the {protocol_name} port (default {DEFAULT_URLS[protocol_name]})")
    elif any(sign in detail for sign in _NOT_JSON):
        cause = (f"{url} answers over HTTP, but not as a KServe v2 server (its answer is not JSON): is it the server's "
                 f"metrics port? Use its {protocol_name} port (default {DEFAULT_URLS[protocol_name]})")
    else:
        cause = f"cannot reach the server at {url} over {protocol_name}"
    first_line = (detail.strip().splitlines() or [""])[0]
    shortened = first_line if len(first_line) <= _DETAIL_CHARACTERS else first_line[:_DETAIL_CHARACTERS] + " …"
    return ServerUnavailable(f"{cause} [{shortened}]")


def without_scheme(url: str | Sequence[str], protocol_name: Protocol) -> tuple[str | list[str], bool]:
    """``url`` with any ``http://``-like scheme taken off its addresses, and whether a scheme asked for
    TLS (``https://``, ``grpcs://``); ValueError (``url: …``) for a scheme of the other protocol."""
    asks_tls = False

    def address(entry: str) -> str:
        nonlocal asks_tls
        entry = entry.strip()
        scheme = next((scheme for scheme in _SCHEMES if entry.lower().startswith(scheme)), None)
        if scheme is None:
            return entry
        scheme_protocol, tls = _SCHEMES[scheme]
        if scheme_protocol != protocol_name:
            raise ValueError(
                f"url: {entry!r} is {_PROTOCOL_NAMES[scheme_protocol]} address, but the protocol is {protocol_name}: use "
                f"protocol {scheme_protocol} (--protocol {scheme_protocol}), or give the {protocol_name} port as host:port"
            )
        asks_tls = asks_tls or tls
        return entry[len(scheme):].rstrip("/")

    if isinstance(url, str):
        return ",".join(address(part) for part in url.split(",")), asks_tls
    return [",".join(address(part) for part in entry.split(",")) for entry in url], asks_tls


def _wire_status(status: str) -> tuple[Protocol, int | str] | None:
    """tritonclient words a gRPC status "StatusCode.NAME" and an HTTP status as its number."""
    if status.startswith("StatusCode."):
        return "grpc", status.removeprefix("StatusCode.")
    return ("http", int(status)) if status.isdigit() else None


def typed_error(exc: InferenceServerException, url: str = "", protocol_name: Protocol = "grpc") -> ServingError:
    """The typed error for what tritonclient raised, through the one table (``patent_classifier_client.errors``)."""
    message = exc.message() or str(exc)
    if any(sign in message for sign in _NOT_JSON):  # an error status whose body is no KServe JSON
        return unreachable(url, protocol_name, message)
    wire = _wire_status(str(exc.status()))
    # No status, or gRPC's UNAVAILABLE from the channel itself: the server could not be reached.
    error = None if wire is None or message.startswith("failed to connect") else error_from_status(*wire, message)
    if error is None:
        return unreachable(url, protocol_name, message)
    if isinstance(error, AccessDenied):
        hint = ("the server keeps this API to itself (an administrative API, closed to clients)" if RESTRICTED_API_REFUSAL in message
                else f"the server requires an access token (--token-file or ${access_token.TOKEN_ENV})")
        return AccessDenied(f"{hint}; {message}")
    return error


@dataclass(frozen=True)
class ServedModelConfig:
    """What a client needs to know of a served model, from its configuration (config.pbtxt)."""

    batched: bool  # Triton batches it (max_batch_size > 0): tensors take a leading batch dimension
    max_documents: int | None  # documents one request may hold (parameter max_documents_per_request)
    num_labels: int | None  # classes the model predicts (parameter num_labels)
    classifies: bool = True  # it takes patents (a TEXT or DOCUMENT input); the feedback model does not

    @classmethod
    def from_json(cls, model_config: dict) -> "ServedModelConfig":
        config = model_config.get("config", model_config)  # gRPC's as_json wraps it
        parameters = {key: entry.get("string_value") for key, entry in config.get("parameters", {}).items()}

        def whole(name: str) -> int | None:
            value = parameters.get(name)
            return int(value) if value and value.isdigit() else None

        # A model whose config.pbtxt lets Triton batch (max_batch_size > 0) takes a leading batch
        # dimension; ours leaves it off (the engine batches), the dynamic-batcher baseline has it.
        inputs = {tensor.get("name") for tensor in config.get("input", [])}
        return cls(
            int(config.get("max_batch_size", 0)) > 0, whole("max_documents_per_request"), whole("num_labels"),
            bool({protocol.TEXT, protocol.DOCUMENT} & inputs),
        )


def _model_names(statistics: dict) -> list[str]:
    """The loaded models' names in a server's inference statistics (an entry per version)."""
    return sorted({entry["name"] for entry in statistics.get("model_stats", [])})


def _classifiers_named(loaded: list[str]) -> str:
    names = [name for name in loaded if name != FEEDBACK_MODEL]
    return f"the classifiers it serves: {', '.join(names)}" if names else "it serves no classifier"


def _chunks(documents: Sequence[Document], size: int | None) -> list[Sequence[Document]]:
    size = size or len(documents)
    return [documents[start : start + size] for start in range(0, len(documents), size)]


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


def _documents_to_send(documents: Sequence[Document]) -> list[Document]:
    """``documents`` as requests carry them. A mapping is taken as a line of the CLI's files is: its
    "id" is the caller's, not the document's (answers come in order), and {"text": ...} is formatted text."""
    if not documents:
        raise InvalidInput("documents", "is empty; send at least 1 document")
    taken = []
    for document in documents:
        if isinstance(document, Mapping):
            document = {name: value for name, value in document.items() if name != "id"}
            if set(document) == {"text"} and isinstance(document["text"], str):
                document = document["text"]
        taken.append(document)
    is_text = [isinstance(document, str) for document in taken]
    if any(is_text) and not all(is_text):
        raise InvalidInput("documents", "mixes formatted texts and structured documents; send them in separate calls")
    return taken


def _encode_documents(documents: Sequence[Document]) -> tuple[str, np.ndarray]:
    if isinstance(documents[0], str):
        return protocol.TEXT, np.array([document.encode("utf-8") for document in documents], dtype=np.object_)
    payloads = [
        document.to_json() if isinstance(document, PatentDocument) else dict(document) for document in documents
    ]
    encoded = [json.dumps(payload, ensure_ascii=False).encode("utf-8") for payload in payloads]
    return protocol.DOCUMENT, np.array(encoded, dtype=np.object_)


class _ClassifierBase:
    def __init__(
        self, url: str | Sequence[str] | None, protocol: Protocol, model: str, timeout_s: float, asynchronous: bool,
        tls: bool, tls_ca: str | Path | None, token: str | None,
    ):
        if url is not None:
            url, scheme_asks_tls = without_scheme(url, protocol)
            tls = tls or scheme_asks_tls
        self.protocol = protocol
        self.url = url if isinstance(url, str) else ",".join(url or [DEFAULT_URLS[protocol]])
        self.model = model
        self.timeout_s = timeout_s
        self._types, client_module = _transport(protocol, asynchronous)
        self._headers = access_token.request_headers(token, protocol)
        tls_options = self._tls_options(asynchronous, tls or tls_ca is not None, tls_ca)

        def new_client(target: str, timeout_s: float, channel_args: list | None):
            grpc_channel = {"channel_args": channel_args} if channel_args else {}
            return client_module.InferenceServerClient(
                target, **self._connection_timeouts(asynchronous, timeout_s), **tls_options, **grpc_channel
            )

        self._served: ServedModelConfig | None = None  # learnt from the model's configuration on first use
        self._connection_errors: tuple[type[Exception], ...] = (OSError, http.client.HTTPException)
        if protocol == "http":
            import rapidjson  # tritonclient.http's JSON: an answer that is not JSON (the metrics port) raises its error

            self._connection_errors += (rapidjson.JSONDecodeError,)
        if asynchronous and protocol == "http":
            import aiohttp  # tritonclient.http.aio's transport; its protocol errors are no OSErrors

            self._connection_errors += (aiohttp.ClientError,)
        self._client = replicas.connect(
            url or self.url, protocol, new_client, timeout_s, self._typed, (InferenceServerException, *self._connection_errors),
            asynchronous, bool(tls_options),
        )

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
        lead = [1] if batched else []
        inputs = [self._types.InferInput(name, lead + [len(elements)], "BYTES")]
        inputs[0].set_data_from_numpy(elements.reshape(lead + [len(elements)]))
        if top_k is not None:
            inputs.append(self._types.InferInput(protocol.TOP_K, lead + [1], "INT32"))
            inputs[-1].set_data_from_numpy(np.array([top_k], dtype=np.int32).reshape(lead + [1]))
        outputs = [self._types.InferRequestedOutput(name) for name, _, _ in protocol.OUTPUT_TENSORS]
        return inputs, outputs

    def _config_kwargs(self) -> dict:
        return {"headers": self._headers, **({"as_json": True} if self.protocol == "grpc" else {})}

    def _typed(self, exc: Exception) -> ServingError:
        """The typed error for what a call raised (``ModelNotFound`` is refined by the caller)."""
        if isinstance(exc, InferenceServerException):
            return typed_error(exc, self.url, self.protocol)
        if isinstance(exc, TimeoutError):  # the HTTP transports' own timeouts: no answer within timeout_s
            return DeadlineExceeded(f"no answer from {self.url} within {self.timeout_s} s")
        # the HTTP transports' socket and protocol errors
        return unreachable(self.url, self.protocol, f"{type(exc).__name__}: {exc}")

    def _connection_timeouts(self, asynchronous: bool, timeout_s: float) -> dict:
        if self.protocol == "grpc":
            return {}
        if asynchronous:
            return {"conn_timeout": timeout_s}
        return {"connection_timeout": timeout_s, "network_timeout": timeout_s}

    def _timeout_kwargs(self) -> dict:
        # "timeout" (microseconds) travels with the request: the server drops the work if it is
        # still queued by then. gRPC also gets a call deadline; HTTP's timeouts are on the client.
        request_timeout = {"timeout": int(self.timeout_s * 1e6)}
        return {**request_timeout, "client_timeout": self.timeout_s} if self.protocol == "grpc" else request_timeout

    def _not_loaded(self, error: ModelNotFound, loaded: list[str]) -> ServingError:
        """Triton answers "unknown model" alike for a name it never had and for a model of its
        repository that is not loaded right now (the watchdog reloading it, say); its repository
        index, which would tell them apart, is closed to clients (server/launcher.py). A model that
        served this client before (its configuration was read) is the second: a server unavailable
        for a while, worth a retry. Otherwise it is named with the classifiers the server has loaded."""
        if self._served is not None:
            return ServerUnavailable(f"model {self.model!r} served this client before and is not loaded now; it may be "
                                     f"reloading: retry ({error.message})")
        if not loaded:  # no list to say more with
            return error
        return ModelNotFound(f"{self.url} serves no model {self.model!r}; {_classifiers_named(loaded)}")

    def _not_a_classifier(self, loaded: list[str]) -> ModelNotFound:
        what = "it takes examiners' corrections" if self.model == FEEDBACK_MODEL else "it takes no TEXT or DOCUMENT input"
        return ModelNotFound(f"model {self.model!r} at {self.url} is not a patent classifier ({what}); {_classifiers_named(loaded)}")

    def _feedback_request(self, corrections: Sequence[Correction]) -> tuple[list, list]:
        if not corrections:
            raise InvalidInput("corrections", "is empty; send at least 1 correction")
        inputs = []
        for name, values in feedback_protocol.encode_corrections(list(corrections)).items():
            inputs.append(self._types.InferInput(name, [len(values)], "BYTES"))
            inputs[-1].set_data_from_numpy(values)
        return inputs, [self._types.InferRequestedOutput(feedback_protocol.VERDICT)]

    def _feedback_error(self, exc: Exception) -> ServingError:
        error = self._typed(exc)
        if isinstance(error, ModelNotFound):
            return ModelNotFound(
                f"{self.url} takes no corrections: it serves no {FEEDBACK_MODEL!r} model, which it has when a "
                "served model records predictions (serving field prediction_records)"
            )
        return error

    @staticmethod
    def _verdicts(result) -> list[str]:
        return [verdict.decode() for verdict in result.as_numpy(feedback_protocol.VERDICT)]

    @staticmethod
    def _answers(result, batched: bool) -> list[protocol.Classification]:
        tensors = {name: result.as_numpy(name) for name, _, _ in protocol.OUTPUT_TENSORS}
        return protocol.decode_answer({name: value[0] if batched else value for name, value in tensors.items()})


class PatentClassifier(_ClassifierBase):
    """Blocking client. Thread-safe for concurrent calls over gRPC; use one per thread over HTTP."""

    def __init__(
        self, url: str | Sequence[str] | None = None, protocol: Protocol = "grpc", model: str = DEFAULT_MODEL, timeout_s: float = 60.0,
        *, tls: bool = False, tls_ca: str | Path | None = None, token: str | None = None,
    ):
        super().__init__(url, protocol, model, timeout_s, False, tls, tls_ca, token)

    def classify(self, document: Document, top_k: int | None = None) -> protocol.Classification:
        return self.classify_batch([document], top_k)[0]

    def classify_batch(self, documents: Sequence[Document], top_k: int | None = None) -> list[protocol.Classification]:
        """Any number of documents, in as many requests as the model's limit per request needs; answers in order."""
        documents = _documents_to_send(documents)
        served = self.served_config()
        return [answer for chunk in _chunks(documents, served.max_documents) for answer in self._classify_request(chunk, top_k)]

    def served_config(self) -> ServedModelConfig:
        """The model's configuration, read from the server once; ``ModelNotFound`` naming the
        classifiers the server has when the model is none of them."""
        if self._served is None:
            served = ServedModelConfig.from_json(self._call(self._client.get_model_config, self.model, **self._config_kwargs()))
            if not served.classifies:
                raise self._not_a_classifier(self._loaded_models())
            self._served = served
        return self._served

    def model_labels(self) -> dict[str, str] | None:
        """Every class the model predicts, code → name; None for a model whose configuration does not
        say how many (exported before ``num_labels`` was written)."""
        num_labels = self.served_config().num_labels
        if num_labels is None:
            return None
        (answer,) = self._classify_request([_ONE_CHARACTER], num_labels)
        return {score.code: score.name for score in answer.labels}

    def ready_models(self) -> list[str]:
        """The names of the models the server has loaded and can answer for, sorted: from its statistics,
        which list exactly those (its repository index is closed to clients, server/launcher.py)."""
        return _model_names(self._call(self._client.get_inference_statistics, **self._config_kwargs()))

    def _classify_request(self, documents: Sequence[Document], top_k: int | None) -> list[protocol.Classification]:
        batched = self.served_config().batched
        inputs, outputs = self._request(documents, top_k, batched)
        result = self._call(self._client.infer, self.model, inputs, outputs=outputs, headers=self._headers, **self._timeout_kwargs())
        return self._answers(result, batched)

    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (InferenceServerException, TimeoutError, *self._connection_errors) as exc:
            error = self._typed(exc)
            if isinstance(error, ModelNotFound):
                error = self._not_loaded(error, self._loaded_models())
            raise error from None

    def _loaded_models(self) -> list[str]:
        try:
            return _model_names(self._client.get_inference_statistics(**self._config_kwargs()))
        except (InferenceServerException, OSError, http.client.HTTPException):
            return []  # only a hint: without it the error stands as reported

    def submit_feedback(
        self, prediction_id: str, correct_label: str, *, examiner_id: str | None = None, comment: str | None = None
    ) -> str:
        """Say which class is right for a classified document; "correct" if it is the answer's top-1, else "wrong".
        Committed on the server before this returns; a second correction of one prediction is refused."""
        return self.submit_feedback_batch([Correction(prediction_id, correct_label, examiner_id, comment)])[0]

    def check_takes_corrections(self) -> None:
        """Raise the typed error every correction would get (the server unreachable, the token refused,
        no feedback model); return when the server takes corrections."""
        try:
            self._client.get_model_config(FEEDBACK_MODEL, **self._config_kwargs())
        except (InferenceServerException, TimeoutError, *self._connection_errors) as exc:
            raise self._feedback_error(exc) from None

    def submit_feedback_batch(self, corrections: Sequence[Correction]) -> list[str]:
        """Several corrections in one request: all recorded, or none (``InvalidInput`` names the bad one)."""
        inputs, outputs = self._feedback_request(corrections)
        try:
            result = self._client.infer(FEEDBACK_MODEL, inputs, outputs=outputs, headers=self._headers, **self._timeout_kwargs())
        except (InferenceServerException, TimeoutError, *self._connection_errors) as exc:
            raise self._feedback_error(exc) from None
        return self._verdicts(result)

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
        self, url: str | Sequence[str] | None = None, protocol: Protocol = "grpc", model: str = DEFAULT_MODEL, timeout_s: float = 60.0,
        *, tls: bool = False, tls_ca: str | Path | None = None, token: str | None = None,
    ):
        super().__init__(url, protocol, model, timeout_s, True, tls, tls_ca, token)

    async def classify(self, document: Document, top_k: int | None = None) -> protocol.Classification:
        return (await self.classify_batch([document], top_k))[0]

    async def classify_batch(self, documents: Sequence[Document], top_k: int | None = None) -> list[protocol.Classification]:
        """Any number of documents, in as many requests as the model's limit per request needs; answers in order."""
        documents = _documents_to_send(documents)
        served = await self.served_config()
        return [answer for chunk in _chunks(documents, served.max_documents) for answer in await self._classify_request(chunk, top_k)]

    async def served_config(self) -> ServedModelConfig:
        """The model's configuration, read from the server once (see ``PatentClassifier.served_config``)."""
        if self._served is None:
            served = ServedModelConfig.from_json(await self._call(self._client.get_model_config, self.model, **self._config_kwargs()))
            if not served.classifies:
                raise self._not_a_classifier(await self._loaded_models())
            self._served = served
        return self._served

    async def model_labels(self) -> dict[str, str] | None:
        """Every class the model predicts, code → name (see ``PatentClassifier.model_labels``)."""
        num_labels = (await self.served_config()).num_labels
        if num_labels is None:
            return None
        (answer,) = await self._classify_request([_ONE_CHARACTER], num_labels)
        return {score.code: score.name for score in answer.labels}

    async def _classify_request(self, documents: Sequence[Document], top_k: int | None) -> list[protocol.Classification]:
        batched = (await self.served_config()).batched
        inputs, outputs = self._request(documents, top_k, batched)
        result = await self._call(self._client.infer, self.model, inputs, outputs=outputs, headers=self._headers, **self._timeout_kwargs())
        return self._answers(result, batched)

    async def _call(self, method, *args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except (InferenceServerException, TimeoutError, *self._connection_errors) as exc:
            error = self._typed(exc)
            if isinstance(error, ModelNotFound):
                error = self._not_loaded(error, await self._loaded_models())
            raise error from None

    async def _loaded_models(self) -> list[str]:
        try:
            return _model_names(await self._client.get_inference_statistics(**self._config_kwargs()))
        except (InferenceServerException, ConnectionError, OSError):
            return []

    async def submit_feedback(
        self, prediction_id: str, correct_label: str, *, examiner_id: str | None = None, comment: str | None = None
    ) -> str:
        return (await self.submit_feedback_batch([Correction(prediction_id, correct_label, examiner_id, comment)]))[0]

    async def check_takes_corrections(self) -> None:
        try:
            await self._client.get_model_config(FEEDBACK_MODEL, **self._config_kwargs())
        except (InferenceServerException, TimeoutError, *self._connection_errors) as exc:
            raise self._feedback_error(exc) from None

    async def submit_feedback_batch(self, corrections: Sequence[Correction]) -> list[str]:
        inputs, outputs = self._feedback_request(corrections)
        try:
            result = await self._client.infer(FEEDBACK_MODEL, inputs, outputs=outputs, headers=self._headers, **self._timeout_kwargs())
        except (InferenceServerException, TimeoutError, *self._connection_errors) as exc:
            raise self._feedback_error(exc) from None
        return self._verdicts(result)

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
