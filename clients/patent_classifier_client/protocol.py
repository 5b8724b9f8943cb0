"""The KServe v2 tensors of a classification request and answer, shared by the Triton model,
the export (which writes them into ``config.pbtxt``) and the clients.

Request (give exactly one of TEXT or DOCUMENT; each holds one element per document):
  TEXT      BYTES [n]   pre-formatted text, UTF-8
  DOCUMENT  BYTES [n]   JSON object {"ipc", "title", "abstract", "claims"}, UTF-8 (ipc optional;
                        empty fields count as absent; at least one of title, abstract, claims
                        holds text: clients/patent_classifier_client/patent_document.py)
  TOP_K     INT32 [1]   optional, how many classes to return per document (default 5)
Answer, per document i and rank j (most likely first):
  LABEL_CODE   BYTES [n, k]
  LABEL_NAME   BYTES [n, k]
  PROBABILITY  FP32  [n, k]
  TOKEN_COUNT  INT32 [n]    tokens the model read
  TRUNCATED    BOOL  [n]    the document was cut at the model's max length
  PREDICTION_ID BYTES [n]   the server's id of this answer, for corrections (clients/patent_classifier_client/feedback_protocol.py)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from patent_classifier_client.errors import InvalidInput
from patent_classifier_client.patent_document import MAX_DOCUMENT_BYTES, PatentDocument, without_control_characters

TEXT = "TEXT"
DOCUMENT = "DOCUMENT"
TOP_K = "TOP_K"
LABEL_CODE = "LABEL_CODE"
LABEL_NAME = "LABEL_NAME"
PROBABILITY = "PROBABILITY"
TOKEN_COUNT = "TOKEN_COUNT"
TRUNCATED = "TRUNCATED"
PREDICTION_ID = "PREDICTION_ID"

# (name, Triton data type, dims) as config.pbtxt declares them.
INPUT_TENSORS = ((TEXT, "TYPE_STRING", (-1,)), (DOCUMENT, "TYPE_STRING", (-1,)), (TOP_K, "TYPE_INT32", (1,)))
OUTPUT_TENSORS = (
    (LABEL_CODE, "TYPE_STRING", (-1, -1)),
    (LABEL_NAME, "TYPE_STRING", (-1, -1)),
    (PROBABILITY, "TYPE_FP32", (-1, -1)),
    (TOKEN_COUNT, "TYPE_INT32", (-1,)),
    (TRUNCATED, "TYPE_BOOL", (-1,)),
    (PREDICTION_ID, "TYPE_STRING", (-1,)),
)


class ScoredDocument(Protocol):
    """One document's scores as the server's engines give them (``core.engine.DocumentScores``)."""

    token_count: int
    truncated: bool

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]: ...


class LabelTable(Protocol):
    """The served model's classes in its score order (``core.labels.LabelSet``)."""

    @property
    def codes(self) -> Sequence[str]: ...

    @property
    def names(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class ClassifyRequest:
    texts: list[str]  # rendered model input, one per document
    top_k: int
    documents: list[PatentDocument] | None = None  # the structured documents, when they came as DOCUMENT


def decode_request(
    text: np.ndarray | None,
    document: np.ndarray | None,
    top_k: np.ndarray | None,
    *,
    num_labels: int,
    max_documents: int,
    default_top_k: int,
) -> ClassifyRequest:
    """Validate the raw input tensors of one request; every error names the field and the limit."""
    if (text is None) == (document is None):
        raise InvalidInput(f"{TEXT}/{DOCUMENT}", "give exactly one of the two inputs")
    field, elements = (TEXT, text) if text is not None else (DOCUMENT, document)
    elements = elements.reshape(-1)
    if elements.size == 0:
        raise InvalidInput(field, "holds no documents; send at least 1")
    if elements.size > max_documents:
        raise InvalidInput(field, f"holds {elements.size} documents; the limit is {max_documents} per request")
    texts = [_decode_element(field, index, element) for index, element in enumerate(elements)]
    documents = None
    if field == DOCUMENT:
        documents = [_parse_document(f"{DOCUMENT}[{index}]", raw) for index, raw in enumerate(texts)]
        texts = [document.render() for document in documents]
    return ClassifyRequest(texts, _decode_top_k(top_k, num_labels, default_top_k), documents)


def _decode_element(field: str, index: int, element: object) -> str:
    where = f"{field}[{index}]"
    if not isinstance(element, (bytes, np.bytes_)):
        raise InvalidInput(where, f"must be BYTES (UTF-8 text), got {type(element).__name__}")
    if len(element) > MAX_DOCUMENT_BYTES:
        raise InvalidInput(where, f"is {len(element)} bytes; the limit is {MAX_DOCUMENT_BYTES} bytes")
    try:
        value = bytes(element).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(where, f"is not valid UTF-8 (byte {exc.start})") from None
    if field == TEXT:
        value = without_control_characters(value)  # as in every field of a DOCUMENT (clients/patent_classifier_client/patent_document.py)
    if not value.strip():
        raise InvalidInput(where, "is empty; send at least 1 character other than spaces and control characters")
    return value


def _parse_document(where: str, raw: str) -> PatentDocument:
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidInput(where, f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except RecursionError:  # "[[[[…" within the byte limit is deeper than Python's parser goes
        raise InvalidInput(where, "is JSON nested too deeply; a document is one flat object") from None
    return PatentDocument.parse(payload, field=where)


def _decode_top_k(top_k: np.ndarray | None, num_labels: int, default_top_k: int) -> int:
    if top_k is None:
        return min(default_top_k, num_labels)
    values = top_k.reshape(-1)
    if not np.issubdtype(values.dtype, np.integer):  # Triton enforces INT32; other callers may not
        raise InvalidInput(TOP_K, f"must be INT32, got {values.dtype}")
    if values.size != 1:
        raise InvalidInput(TOP_K, f"must hold exactly 1 value, got {values.size}")
    k = int(values[0])
    if not 1 <= k <= num_labels:
        raise InvalidInput(TOP_K, f"is {k}; it must be between 1 and {num_labels} (the number of labels)")
    return k


def encode_answer(
    scores: Sequence[ScoredDocument], labels: LabelTable, top_k: int, prediction_ids: Sequence[str]
) -> dict[str, np.ndarray]:
    """The output tensors for one request."""
    ranked = [document.top_k(top_k) for document in scores]
    codes, names = labels.codes, labels.names
    return {
        LABEL_CODE: np.array([[codes[i].encode() for i in order] for order, _ in ranked], dtype=np.object_),
        LABEL_NAME: np.array([[names[i].encode() for i in order] for order, _ in ranked], dtype=np.object_),
        PROBABILITY: np.array([probabilities for _, probabilities in ranked], dtype=np.float32),
        TOKEN_COUNT: np.array([document.token_count for document in scores], dtype=np.int32),
        TRUNCATED: np.array([document.truncated for document in scores], dtype=np.bool_),
        PREDICTION_ID: np.array([prediction_id.encode() for prediction_id in prediction_ids], dtype=np.object_),
    }


@dataclass(frozen=True)
class LabelScore:
    code: str
    name: str
    probability: float


@dataclass(frozen=True)
class Classification:
    """What a client gets back for one document."""

    labels: list[LabelScore]  # most likely first
    token_count: int
    truncated: bool
    # For a correction of this answer (PatentClassifier.submit_feedback). Unique per answer, so it
    # is left out of equality: two answers to one document are equal when their content is.
    prediction_id: str = field(compare=False)

    def to_json(self) -> dict:
        return {
            "labels": [{"code": s.code, "name": s.name, "probability": s.probability} for s in self.labels],
            "token_count": self.token_count,
            "truncated": self.truncated,
            "prediction_id": self.prediction_id,
        }


def decode_answer(outputs: dict[str, np.ndarray]) -> list[Classification]:
    """Inverse of ``encode_answer``, for clients."""
    codes, names, probabilities = outputs[LABEL_CODE], outputs[LABEL_NAME], outputs[PROBABILITY]
    return [
        Classification(
            labels=[
                LabelScore(code.decode(), name.decode(), float(probability))
                for code, name, probability in zip(codes[row], names[row], probabilities[row])
            ],
            token_count=int(outputs[TOKEN_COUNT][row]),
            truncated=bool(outputs[TRUNCATED][row]),
            prediction_id=outputs[PREDICTION_ID][row].decode(),
        )
        for row in range(codes.shape[0])
    ]
