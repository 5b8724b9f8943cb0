"""Clients for the patent classifier server: a Python library (``PatentClassifier``,
``AsyncPatentClassifier``) and a command line (``python -m clients``). Needs no torch."""
from core.errors import InvalidInput, ServingError
from core.feedback_protocol import Correction
from core.patent_document import PatentDocument
from core.protocol import Classification, LabelScore

from clients.patent_classifier import AsyncPatentClassifier, PatentClassifier

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
