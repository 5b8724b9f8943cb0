"""A patent document and the one text template that turns it into model input.

The fine-tune was fed the fields in this order: IPC codes, title, abstract, claims. The
served model must see text built the same way, so every path into the model (the Triton
model, the export's merge proof, the benchmarks, offline reference runs in tests) renders
documents with ``PatentDocument.render`` and nothing else. If the office's training script
used other field labels, change ``TEXT_TEMPLATE`` here and nowhere else: one line per field,
each line naming its field once.

Offices send what they have, the way their databases hold it: a new application has no IPC
code yet, some records carry only a title or only claims, and an exported row says "none" with
an empty column. So in every field "" (or blank, or nothing but control characters), null and []
all mean absent, and so does a list whose entries are all blank; blank entries of a list are
dropped. An absent field's template line is left out. At least one of title, abstract and claims
must hold text; a document without any gets one error saying so. These rules live here and only
here: the server, the client library, the CLI's files and the web page all parse documents with
``PatentDocument``.

Control characters (Unicode category Cc: NUL, the other C0 codes and DEL and the C1 codes) are
removed from every text, fields and pre-formatted ``TEXT`` alike, except tab, line feed and
carriage return, which are layout. They come from fixed-width database columns padded with NULs
and from mangled encodings, and they carry no text: the tokenizer would turn them into byte
tokens the model never saw in training. A text left blank by their removal is refused like a
blank one, rather than classified as if it were a patent.
"""
from __future__ import annotations

import functools
import json
import re
import string
from typing import Annotated, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from patent_classifier_client.errors import InvalidInput

TEXT_TEMPLATE = "IPC: {ipc}\n발명의 명칭: {title}\n요약: {abstract}\n청구범위: {claims}"

# A request may carry a whole patent (claims can run to tens of kilobytes), but nothing
# past the model's token window is ever read, so anything far beyond it is a client bug.
MAX_DOCUMENT_BYTES = 256 * 1024

_IPC_SEPARATORS = re.compile(r"\s*[;,|]\s*")
_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
TEXT_FIELDS = ("title", "abstract", "claims")  # at least one of these must be present


def without_control_characters(text: str) -> str:
    """``text`` without the control characters the module docstring names (tab and newlines stay)."""
    return _CONTROL_CHARACTERS.sub("", text)


def _clean(value: object) -> object:
    return without_control_characters(value) if isinstance(value, str) else value


def _is_blank(value: object) -> bool:
    return isinstance(value, str) and not without_control_characters(value).strip()


# Control characters go first, then pydantic strips whitespace; blank values never get this far
# (PatentDocument._absent_fields takes them out), so what is left holds text.
Text = Annotated[str, BeforeValidator(_clean)]


@functools.cache
def _template_lines() -> tuple[tuple[str, str], ...]:
    """(field, template line) for each line of TEXT_TEMPLATE."""
    lines = []
    for line in TEXT_TEMPLATE.split("\n"):
        (field,) = [name for _, name, _, _ in string.Formatter().parse(line) if name]
        lines.append((field, line))
    return tuple(lines)


class PatentDocument(BaseModel):
    """IPC codes, title, abstract and claims of one patent, as the office's backend sends them."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    ipc: list[Text] = Field(default_factory=list, description='IPC codes, e.g. ["G06F 16/35", "G06N 3/08"]; optional')
    title: Optional[Text] = None
    abstract: Optional[Text] = None
    claims: list[Text] = Field(default_factory=list, description="claims in order; one string is one claim")

    @model_validator(mode="before")
    @classmethod
    def _absent_fields(cls, payload: object) -> object:
        if not isinstance(payload, dict):
            return payload
        present = {}
        for name, value in payload.items():
            if name in cls.model_fields:
                if isinstance(value, list):
                    value = [entry for entry in value if not _is_blank(entry)]
                if value is None or value == [] or _is_blank(value):
                    continue
            present[name] = value
        return present

    @field_validator("ipc", mode="before")
    @classmethod
    def _split_ipc_string(cls, value: object) -> object:
        # Patent databases often hold IPC codes as one "G06F 16/35; G06N 3/08" string.
        if isinstance(value, str):
            return [code for code in _IPC_SEPARATORS.split(without_control_characters(value).strip()) if code]
        return value

    @field_validator("claims", mode="before")
    @classmethod
    def _single_claim_string(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _some_text(self) -> "PatentDocument":
        if self.title is None and self.abstract is None and not self.claims:
            raise ValueError("no_text")
        return self

    def render(self) -> str:
        values = {"ipc": ", ".join(self.ipc), "title": self.title, "abstract": self.abstract, "claims": "\n".join(self.claims)}
        return "\n".join(line.format(**values) for field, line in _template_lines() if values[field])

    def to_json(self) -> dict:
        """The fields that are present, as a request carries them."""
        return self.model_dump(exclude_defaults=True)

    @classmethod
    def parse(cls, payload: object, field: str = "DOCUMENT") -> "PatentDocument":
        """Validate a decoded JSON object; errors name the offending field, e.g. ``DOCUMENT[2].title``."""
        if not isinstance(payload, dict):
            raise InvalidInput(field, f"must be a JSON object with keys ipc, title, abstract, claims; got {type(payload).__name__}")
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            location = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"])
            raise InvalidInput(f"{field}{location}", _describe(first)) from None


def _describe(error: dict) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field (allowed: ipc, title, abstract, claims)"
    if kind in ("string_type", "list_type"):
        expected = "a string" if kind == "string_type" else "a list of strings (or one string)"
        return f"must be {expected}, got {type(error.get('input')).__name__}"
    if kind == "value_error" and "no_text" in error["msg"]:
        return (f"holds none of {', '.join(TEXT_FIELDS)}: the document has no text (a field that is empty, blank or "
                "null counts as absent); send at least one of them")
    return error["msg"]


# One line of a JSON-lines file of patents (the CLI's files, make eval's labelled file, the
# export's agreement patents): an object with the document's fields, or {"text": ...}.


def json_object(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInput(where, f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(record, dict):
        raise InvalidInput(where, f"must be a JSON object, got {type(record).__name__}")
    return record


def patent_document(record: dict, where: str) -> PatentDocument | str:
    """The document of one line's object, once the id (and any field of the caller's) is taken out."""
    if set(record) == {"text"}:
        text = record["text"]
        if not isinstance(text, str) or not without_control_characters(text).strip():
            raise InvalidInput(f"{where}.text", "must be text with at least 1 character other than spaces and control characters")
        return text
    return PatentDocument.parse(record, field=where)
