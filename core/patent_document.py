"""A patent document and the one text template that turns it into model input.

The fine-tune was fed the fields in this order: IPC codes, title, abstract, claims. The
served model must see text built the same way, so every path into the model (the Triton
model, the export's merge proof, the benchmarks, offline reference runs in tests) renders
documents with ``PatentDocument.render`` and nothing else. If the office's training script
used other field labels, change ``TEXT_TEMPLATE`` here and nowhere else.
"""
from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import InvalidInput

TEXT_TEMPLATE = "IPC: {ipc}\n발명의 명칭: {title}\n요약: {abstract}\n청구범위: {claims}"

# A request may carry a whole patent (claims can run to tens of kilobytes), but nothing
# past the model's token window is ever read, so anything far beyond it is a client bug.
MAX_DOCUMENT_BYTES = 256 * 1024

_IPC_SEPARATORS = re.compile(r"\s*[;,|]\s*")

NonEmptyText = Annotated[str, Field(min_length=1)]


class PatentDocument(BaseModel):
    """IPC codes, title, abstract and claims of one patent, as the office's backend sends them."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    ipc: list[NonEmptyText] = Field(min_length=1, description='IPC codes, e.g. ["G06F 16/35", "G06N 3/08"]')
    title: NonEmptyText
    abstract: NonEmptyText
    claims: list[NonEmptyText] = Field(min_length=1, description="claims in order; one string is one claim")

    @field_validator("ipc", mode="before")
    @classmethod
    def _split_ipc_string(cls, value: object) -> object:
        # Patent databases often hold IPC codes as one "G06F 16/35; G06N 3/08" string.
        if isinstance(value, str):
            return [code for code in _IPC_SEPARATORS.split(value.strip()) if code]
        return value

    @field_validator("claims", mode="before")
    @classmethod
    def _single_claim_string(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    def render(self) -> str:
        claims = "\n".join(self.claims)
        return TEXT_TEMPLATE.format(ipc=", ".join(self.ipc), title=self.title, abstract=self.abstract, claims=claims)

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
    if kind in ("string_too_short", "too_short"):
        return "must not be empty"
    if kind in ("string_type", "list_type"):
        expected = "a string" if kind == "string_type" else "a list of strings (or one string)"
        return f"must be {expected}, got {type(error.get('input')).__name__}"
    return error["msg"]
