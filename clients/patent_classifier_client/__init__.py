"""The patent classifier server's client: a Python library (``PatentClassifier``,
``AsyncPatentClassifier``) and a command line (``patent-classify``). Needs no torch.

It also holds what the server shares with its callers, once: the wire protocol (``protocol``,
``feedback_protocol``), the patent document and its template (``patent_document``) and the error
table (``errors``). The server imports those modules; the classes below load tritonclient only
when first used, so the server's imports of the shared modules do not."""
from __future__ import annotations

from typing import TYPE_CHECKING

from patent_classifier_client.errors import InvalidInput, ServingError
from patent_classifier_client.feedback_protocol import Correction
from patent_classifier_client.patent_document import PatentDocument
from patent_classifier_client.protocol import Classification, LabelScore

if TYPE_CHECKING:
    from patent_classifier_client.patent_classifier import AsyncPatentClassifier, PatentClassifier

_CLIENTS = ("AsyncPatentClassifier", "PatentClassifier")


def __getattr__(name: str):
    if name in _CLIENTS:
        from patent_classifier_client import patent_classifier

        return getattr(patent_classifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncPatentClassifier",
    "Classification",
    "Correction",
    "InvalidInput",
    "LabelScore",
    "PatentClassifier",
    "PatentDocument",
    "ServingError",
]
