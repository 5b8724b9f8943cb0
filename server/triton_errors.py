"""Our typed errors as Triton responses: the one mapping from ``core.errors.ErrorKind`` to
Triton's error codes (which Triton maps to HTTP and gRPC status), for every Triton model of ours.

``pb_utils`` is passed in: the stub adds ``TritonError`` to it only after model.py is imported.
"""
from __future__ import annotations

from core.errors import ErrorKind, ServingError

# Kinds that share Triton's UNAVAILABLE code travel with their name in front of the message,
# so clients can still tell "retry later" (overloaded) from "too late" (deadline) apart.
_NAMED_KINDS = (ErrorKind.OVERLOADED, ErrorKind.DEADLINE_EXCEEDED)


def triton_error_code(pb_utils, kind: ErrorKind):
    codes = pb_utils.TritonError
    return {
        ErrorKind.INVALID_INPUT: codes.INVALID_ARG,
        ErrorKind.OVERLOADED: codes.UNAVAILABLE,
        ErrorKind.DEADLINE_EXCEEDED: codes.UNAVAILABLE,
        ErrorKind.CANCELLED: codes.CANCELLED,
        ErrorKind.MODEL_NOT_FOUND: codes.NOT_FOUND,
        ErrorKind.ENGINE_FAILURE: codes.INTERNAL,
        ErrorKind.UNAVAILABLE: codes.UNAVAILABLE,
        # Triton checks the access token before a request reaches the model; listed so the table is total.
        ErrorKind.ACCESS_DENIED: codes.UNAVAILABLE,
    }[kind]


def error_response(pb_utils, error: ServingError):
    message = f"{error.kind.value}: {error.message}" if error.kind in _NAMED_KINDS else error.message
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, triton_error_code(pb_utils, error.kind)))
