"""One typed error per failure a caller can see.

Each error carries an ``ErrorKind``; the Triton adapter maps kinds to Triton error codes
(and so to HTTP/gRPC status) in one table, and the client maps statuses back in one table.
"""
from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID_INPUT = "invalid_input"  # HTTP 400, gRPC INVALID_ARGUMENT
    OVERLOADED = "overloaded"  # HTTP 503, gRPC UNAVAILABLE
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    MODEL_NOT_FOUND = "model_not_found"  # HTTP 400/404, gRPC NOT_FOUND
    ENGINE_FAILURE = "engine_failure"  # HTTP 500, gRPC INTERNAL
    UNAVAILABLE = "unavailable"  # server down or not ready
    ACCESS_DENIED = "access_denied"  # no or wrong access token: HTTP 403, gRPC UNAVAILABLE/PERMISSION_DENIED


class ServingError(Exception):
    kind: ErrorKind = ErrorKind.ENGINE_FAILURE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(ServingError):
    """A request field is missing, malformed or outside its limit; the message names both."""

    kind = ErrorKind.INVALID_INPUT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class Overloaded(ServingError):
    kind = ErrorKind.OVERLOADED

    @classmethod
    def queue_full(cls, queued_tokens: int, needed_tokens: int, max_queue_tokens: int) -> "Overloaded":
        """The one wording of a refused admission, whichever engine refuses."""
        return cls(
            f"queue full: {queued_tokens} tokens queued, this request needs {needed_tokens} more and the limit "
            f"is max_queue_tokens={max_queue_tokens}; retry later"
        )


class DeadlineExceeded(ServingError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    kind = ErrorKind.CANCELLED


class ModelNotFound(ServingError):
    kind = ErrorKind.MODEL_NOT_FOUND


class EngineFailure(ServingError):
    kind = ErrorKind.ENGINE_FAILURE


class ServerUnavailable(ServingError):
    kind = ErrorKind.UNAVAILABLE


class AccessDenied(ServingError):
    """The request lacks the access token the server requires (or carries a wrong one)."""

    kind = ErrorKind.ACCESS_DENIED


_ERROR_TYPES: dict[ErrorKind, type[ServingError]] = {
    error_type.kind: error_type
    for error_type in (Overloaded, DeadlineExceeded, Cancelled, ModelNotFound, EngineFailure, ServerUnavailable, AccessDenied)
}


def error_from_kind(kind: ErrorKind, message: str) -> ServingError:
    """Rebuild the typed error a server reported (used by the client's status mapping)."""
    if kind is ErrorKind.UNAVAILABLE:
        # The server names kinds that share the UNAVAILABLE status in front of the message.
        for named in (ErrorKind.OVERLOADED, ErrorKind.DEADLINE_EXCEEDED):
            if message.startswith(f"{named.value}: "):
                return _ERROR_TYPES[named](message[len(named.value) + 2 :])
    if kind is ErrorKind.INVALID_INPUT:
        # The server always words these "field: problem", so the field survives the trip.
        field, _, problem = message.partition(": ")
        return InvalidInput(field, problem) if problem else InvalidInput("request", message)
    return _ERROR_TYPES[kind](message)
