"""Reading the JSON-lines files the CLI takes (``classify``, ``evaluate``): one patent per line,
either its fields ({"ipc", "title", "abstract", "claims"}) or {"text": ...} already formatted, with
an optional "id" (the line number otherwise). Documents are checked here, with the rules the
server applies (``patent_classifier_client.patent_document``), so an error names the file's line and the field
(``patents.jsonl line 7.title: must be a string, got int``) instead of a position in some request.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterator, TextIO, Union

from patent_classifier_client.errors import InvalidInput, ServingError
from patent_classifier_client.patent_document import PatentDocument, json_object, patent_document

Identifier = Union[str, int]
_REQUEST_FIELD = re.compile(r"^(DOCUMENT|TEXT)\[\d+\]")


@dataclass(frozen=True)
class PatentLine:
    number: int  # in the file, from 1
    identifier: Identifier
    document: PatentDocument | str | ServingError  # the error when the line cannot be sent


def read_patent_lines(handle: TextIO, name: str) -> Iterator[PatentLine]:
    """Every non-blank line, lazily; a line that cannot be read carries its error and the others go on."""
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        identifier: Identifier = number
        try:
            record = json_object(line, where)
            identifier = line_id(record, where, number)
            document = patent_document(record, where)
        except InvalidInput as error:
            yield PatentLine(number, identifier, error)
        else:
            yield PatentLine(number, identifier, document)


def line_id(record: dict, where: str, number: int) -> Identifier:
    """The line's "id", taken out of ``record``; the line number when it has none."""
    identifier = record.pop("id", number)
    if isinstance(identifier, bool) or not isinstance(identifier, (str, int)):
        raise InvalidInput(f"{where}.id", f"must be a string or a whole number, got {json.dumps(identifier)}")
    return identifier


def at_line(error: ServingError, line: PatentLine, name: str) -> ServingError:
    """A server's error about one document sent alone (``DOCUMENT[0].title``), renamed for its line."""
    if not isinstance(error, InvalidInput) or not _REQUEST_FIELD.match(error.field):
        return error
    where = f"{name} line {line.number}" + (".text" if error.field.startswith("TEXT") else "")
    return InvalidInput(_REQUEST_FIELD.sub(where, error.field), error.problem)
