"""The id the server gives every classified document: a UUID version 7 (RFC 9562).

Its first 48 bits are the Unix time in milliseconds, so ids sort by time (database index pages
fill in order) and the feedback model can tell an id the database has not received yet (minted
a moment ago, its record still on its way) from one that never existed, without storing either.
"""
from __future__ import annotations

import secrets
import time
import uuid

from patent_classifier_client.errors import InvalidInput


def new_prediction_id(now_ms: int | None = None) -> str:
    milliseconds = int(time.time() * 1000) if now_ms is None else now_ms
    value = (milliseconds & ((1 << 48) - 1)) << 80 | secrets.randbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    return str(uuid.UUID(int=value))


def parse_prediction_id(text: str, field: str) -> str:
    """The canonical form of a prediction id, or ``InvalidInput`` naming ``field``."""
    try:
        parsed = uuid.UUID(text)
    except (ValueError, AttributeError, TypeError):
        raise InvalidInput(field, f"{text!r} is not a prediction id (the UUID a classification answer's PREDICTION_ID holds)") from None
    if parsed.version != 7:
        raise InvalidInput(field, f"{text!r} is a UUID but not a prediction id (those are UUID version 7)")
    return str(parsed)


def minted_at(prediction_id: str) -> float:
    """Unix time in seconds at which the server minted this id."""
    return (uuid.UUID(prediction_id).int >> 80) / 1000.0
