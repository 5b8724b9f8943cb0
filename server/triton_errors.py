"""Our typed errors as Triton responses, for every Triton model of ours: the code and message
come from the one table (``patent_classifier_client.errors.WIRE``), which says what Triton makes of them.

``pb_utils`` is passed in: the stub adds ``TritonError`` to it only after model.py is imported.
"""
from __future__ import annotations

from patent_classifier_client.errors import ServingError, triton_error


def error_response(pb_utils, error: ServingError):
    code, message = triton_error(error)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))
