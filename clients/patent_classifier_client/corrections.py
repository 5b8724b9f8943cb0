"""Examiners' corrections in files: submitted to the server from JSON lines (``python -m patent_classifier_client
feedback submit``), and the corrected examples exported from the records database as training
data (``python -m patent_classifier_client feedback export``).

A corrections file holds one correction per line:
    {"prediction_id": "<the answer's prediction_id>", "label": "KSCST-017", "examiner_id": "e-42", "comment": "..."}
(``examiner_id`` and ``comment`` optional). The export writes the fine-tune's own input format,
one corrected example per line: {"ipc", "title", "abstract", "claims", "label"} for a patent sent
as a structured document, {"text", "label"} for one sent as formatted text (the format `make
eval` reads too). Only predictions recorded with ``prediction_records: text`` kept their text;
the others are counted, not exported.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

from patent_classifier_client.errors import InvalidInput, ServingError
from patent_classifier_client.feedback_protocol import Correction
from patent_classifier_client.batch_classification import ServerAddress, in_batches
from patent_classifier_client.server_side import server_module

CorrectionOrError = Union[Correction, ServingError]
TRAINING_FIELDS = ("ipc", "title", "abstract", "claims")


def read_corrections(lines: Sequence[str], name: str) -> list[tuple[int, CorrectionOrError]]:
    """(line number, correction or the error that line has), for every non-blank line of the file ``name``."""
    parsed = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            parsed.append((number, _parse_correction(line, f"{name} line {number}")))
    return parsed


def _parse_correction(line: str, where: str) -> CorrectionOrError:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return InvalidInput(where, f"is not valid JSON ({exc.msg})")
    if not isinstance(record, dict):
        return InvalidInput(where, "must be a JSON object with prediction_id and label")
    unknown = set(record) - {"prediction_id", "label", "examiner_id", "comment"}
    if unknown:
        return InvalidInput(f"{where}.{sorted(unknown)[0]}", "unknown field (allowed: prediction_id, label, examiner_id, comment)")
    for name in ("prediction_id", "label"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            return InvalidInput(f"{where}.{name}", "required: a non-empty string")
    for name in ("examiner_id", "comment"):
        if record.get(name) is not None and not isinstance(record[name], str):
            return InvalidInput(f"{where}.{name}", f"must be a string, got {type(record[name]).__name__}")
    return Correction(record["prediction_id"], record["label"], record.get("examiner_id"), record.get("comment"))


def submit_in_batches(
    corrections: Sequence[CorrectionOrError], server: ServerAddress, batch_size: int = 32, concurrency: int = 2
) -> Iterator[list[str | ServingError]]:
    """Each correction's verdict or error, batch by batch, in input order. A request is recorded whole
    or not at all, so a batch that one bad correction fails is resent one by one: the rest are recorded."""
    for batch in in_batches(
        enumerate(corrections), server, lambda client, good: client.submit_feedback_batch(good),
        lambda client, correction: client.submit_feedback_batch([correction])[0], batch_size, concurrency,
    ):
        yield [outcome for _, outcome in batch]


@dataclass(frozen=True)
class ExportCounts:
    written: int
    without_text: int  # corrected, but recorded without its text (prediction_records: hash)


def export_corrected_examples(database_url: str, out: Path, model: str | None = None) -> ExportCounts:
    """Write ``out``; ``InvalidInput`` for a database that is not there or holds no records (nothing is
    written), ``ServingError`` for one that cannot be read. The database is opened read-only."""
    PredictionStore = server_module("core.prediction_store", "feedback export").PredictionStore
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    store = PredictionStore(database_url, read_only=True)
    shown = make_url(store.url).render_as_string(hide_password=True)
    written = without_text = 0
    try:
        rows = store.corrected_examples(model)
        first = next(rows, None)  # the query runs here: a database that cannot be read leaves no file behind
        with open(out, "w", encoding="utf-8") as handle:
            for row in itertools.chain([first] if first is not None else [], rows):
                example = training_example(row)
                if example is None:
                    without_text += 1
                    continue
                handle.write(json.dumps(example, ensure_ascii=False) + "\n")
                written += 1
    except SQLAlchemyError as error:
        raise _unreadable(shown, error) from None
    finally:
        store.close()
    return ExportCounts(written, without_text)


def _unreadable(database: str, error: Exception) -> ServingError:
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]  # SQLAlchemy adds lines of its own
    if "unable to open database file" in reason:
        return InvalidInput(f"--database {database}", "no such database file (this command reads the records database "
                            "the server writes and never creates one)")
    if "no such table" in reason:
        return InvalidInput(f"--database {database}", f"is not a records database ({reason})")
    return ServingError(f"cannot read the records database {database}: {type(error).__name__}: {reason}")


def training_example(row: dict) -> dict | None:
    """A corrected prediction as the fine-tune reads it, labelled with the examiner's class; None without text."""
    if row["document"] is not None:
        return {**{name: row["document"][name] for name in TRAINING_FIELDS}, "label": row["correct_label"]}
    if row["text"] is not None:
        return {"text": row["text"], "label": row["correct_label"]}
    return None
