"""The KServe v2 tensors of the feedback model: examiners' corrections of recorded predictions,
through the same server, ports, protocols and access token as classification.

The export adds the model, named ``feedback``, to the Triton repository when any model records
predictions (serving field ``prediction_records``). Request, one element per correction:
  PREDICTION_ID  BYTES [n]  the PREDICTION_ID the classification answer gave the document
  CORRECT_LABEL  BYTES [n]  the class code that is right for it (the predicted top-1 confirms it)
  EXAMINER_ID    BYTES [n]  optional; "" for none
  COMMENT        BYTES [n]  optional; "" for none
Answer:
  VERDICT        BYTES [n]  "correct" (CORRECT_LABEL is the predicted top-1) or "wrong"
A request is recorded whole or not at all: any bad element fails it, naming the element.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import numpy as np

from patent_classifier_client.errors import InvalidInput
from patent_classifier_client.prediction_id import parse_prediction_id

FEEDBACK_MODEL = "feedback"

PREDICTION_ID = "PREDICTION_ID"
CORRECT_LABEL = "CORRECT_LABEL"
EXAMINER_ID = "EXAMINER_ID"
COMMENT = "COMMENT"
VERDICT = "VERDICT"
VERDICTS = ("correct", "wrong")

INPUT_TENSORS = tuple((name, "TYPE_STRING", (-1,)) for name in (PREDICTION_ID, CORRECT_LABEL, EXAMINER_ID, COMMENT))
OUTPUT_TENSORS = ((VERDICT, "TYPE_STRING", (-1,)),)

MAX_CORRECTIONS_PER_REQUEST = 256
MAX_CHARACTERS = {CORRECT_LABEL: 128, EXAMINER_ID: 128, COMMENT: 4000}
# Control characters a field may hold: a comment its line breaks and tabs; nothing else may hold
# any (PostgreSQL's text refuses NUL outright, and the others are no part of a code or a name).
ALLOWED_CONTROL_CHARACTERS = {CORRECT_LABEL: "", EXAMINER_ID: "", COMMENT: "\t\n\r"}


@dataclass(frozen=True)
class Correction:
    """One examiner's word on one prediction: the class that is right for the document."""

    prediction_id: str
    correct_label: str
    examiner_id: str | None = None
    comment: str | None = None


def decode_corrections(inputs: dict[str, np.ndarray | None]) -> list[Correction]:
    """Validate one request's tensors; every error names the element and the limit."""
    ids = _strings(inputs.get(PREDICTION_ID), PREDICTION_ID, required=True)
    if len(ids) > MAX_CORRECTIONS_PER_REQUEST:
        raise InvalidInput(PREDICTION_ID, f"holds {len(ids)} corrections; the limit is {MAX_CORRECTIONS_PER_REQUEST} per request")
    columns = {name: _strings(inputs.get(name), name, required=name == CORRECT_LABEL) for name in MAX_CHARACTERS}
    for name, values in columns.items():
        if values is not None and len(values) != len(ids):
            raise InvalidInput(name, f"holds {len(values)} elements; {PREDICTION_ID} holds {len(ids)} (one per correction)")
    canonical = [parse_prediction_id(value, f"{PREDICTION_ID}[{index}]") for index, value in enumerate(ids)]
    seen: dict[str, int] = {}
    for index, prediction_id in enumerate(canonical):
        if prediction_id in seen:
            raise InvalidInput(f"{PREDICTION_ID}[{index}]", f"repeats {PREDICTION_ID}[{seen[prediction_id]}]; one correction per prediction")
        seen[prediction_id] = index
    for name, values in columns.items():
        for index, value in enumerate(values or ()):
            if len(value) > MAX_CHARACTERS[name]:
                raise InvalidInput(f"{name}[{index}]", f"is {len(value)} characters; the limit is {MAX_CHARACTERS[name]}")
            control = next((c for c in value if unicodedata.category(c) == "Cc" and c not in ALLOWED_CONTROL_CHARACTERS[name]), None)
            if control is not None:
                raise InvalidInput(f"{name}[{index}]", f"holds the control character U+{ord(control):04X} at position "
                                   f"{value.index(control)}; send plain text")
    for index, label in enumerate(columns[CORRECT_LABEL]):
        if not label.strip():
            raise InvalidInput(f"{CORRECT_LABEL}[{index}]", "is empty; send the class code that is right for the document")

    def optional(name: str, index: int) -> str | None:
        values = columns[name]
        return None if values is None else (values[index].strip() or None)

    return [
        Correction(prediction_id, columns[CORRECT_LABEL][index].strip(), optional(EXAMINER_ID, index), optional(COMMENT, index))
        for index, prediction_id in enumerate(canonical)
    ]


def _strings(tensor: np.ndarray | None, name: str, required: bool) -> list[str] | None:
    if tensor is None:
        if required:
            raise InvalidInput(name, "is missing; send one element per correction")
        return None
    elements = tensor.reshape(-1)
    if required and elements.size == 0:
        raise InvalidInput(name, "holds no elements; send at least 1 correction")
    values = []
    for index, element in enumerate(elements):
        if not isinstance(element, (bytes, np.bytes_)):
            raise InvalidInput(f"{name}[{index}]", f"must be BYTES (UTF-8 text), got {type(element).__name__}")
        try:
            values.append(bytes(element).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{name}[{index}]", f"is not valid UTF-8 (byte {exc.start})") from None
    return values


def encode_verdicts(verdicts: list[str]) -> dict[str, np.ndarray]:
    return {VERDICT: np.array([verdict.encode() for verdict in verdicts], dtype=np.object_)}


def encode_corrections(corrections: list[Correction]) -> dict[str, np.ndarray]:
    """The request tensors for ``Correction``s, for clients."""
    def column(values) -> np.ndarray:
        return np.array([(value or "").encode("utf-8") for value in values], dtype=np.object_)

    return {
        PREDICTION_ID: column(c.prediction_id for c in corrections),
        CORRECT_LABEL: column(c.correct_label for c in corrections),
        EXAMINER_ID: column(c.examiner_id for c in corrections),
        COMMENT: column(c.comment for c in corrections),
    }
