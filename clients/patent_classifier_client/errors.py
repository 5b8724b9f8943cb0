"""One typed error per failure a caller can see, and the one table of how each travels.

Each error carries an ``ErrorKind``. ``WIRE`` says, per kind, the Triton error code the served
model answers it with, the HTTP status and gRPC status code tritonserver turns that code into,
and the prefix the message carries where kinds share a status. ``triton_error`` encodes (the
Triton model builds its ``pb_utils.TritonError`` from it); ``error_from_status`` decodes what a
client received, so a caller catches the same exception over either protocol.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal


class ErrorKind(enum.Enum):
    INVALID_INPUT = "invalid_input"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    MODEL_NOT_FOUND = "model_not_found"
    ENGINE_FAILURE = "engine_failure"
    UNAVAILABLE = "unavailable"  # server down, not ready, or unreachable
    ACCESS_DENIED = "access_denied"  # no or a wrong access token


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

    @classmethod
    def internal(cls, error: BaseException) -> "EngineFailure":
        """A fault of ours (a bug, not the model) on one request, as its caller is told."""
        return cls(f"internal error: {type(error).__name__}: {error}")


class ServerUnavailable(ServingError):
    kind = ErrorKind.UNAVAILABLE


class AccessDenied(ServingError):
    """The request lacks the access token the server requires (or carries a wrong one)."""

    kind = ErrorKind.ACCESS_DENIED


_ERROR_TYPES: dict[ErrorKind, type[ServingError]] = {
    error_type.kind: error_type
    for error_type in (
        InvalidInput, Overloaded, DeadlineExceeded, Cancelled, ModelNotFound, EngineFailure, ServerUnavailable, AccessDenied
    )
}


def error_from_kind(kind: ErrorKind, message: str) -> ServingError:
    """The typed error of ``kind`` with ``message``."""
    if kind is ErrorKind.INVALID_INPUT:
        # The server always words these "field: problem", so the field survives the trip.
        field, _, problem = message.partition(": ")
        return InvalidInput(field, problem) if problem else InvalidInput("request", message)
    return _ERROR_TYPES[kind](message)


Protocol = Literal["http", "grpc"]


@dataclass(frozen=True)
class WireCoding:
    triton_code: str  # the pb_utils.TritonError code the served model answers with, by name
    http_status: int  # what tritonserver's HTTP front end turns that code into
    grpc_status: str  # ... and its gRPC front end, a grpc.StatusCode name
    prefix: str  # put in front of the message: another kind travels with the same status

    def status(self, protocol: Protocol) -> int | str:
        return self.http_status if protocol == "http" else self.grpc_status


# Triton 2.51 maps its codes in src/http_server.cc (HttpCodeFromError) and src/grpc/grpc_utils.cc;
# tests/test_error_table.py checks every row against the real server. Triton has no code for
# "too many requests" or "too late", so overload and deadlines travel as UNAVAILABLE, named; and
# its HTTP front end answers CANCELLED with 400, as it does INVALID_ARG, so cancellation is named.
# The access token is checked by the served model (server/token_check.py), and Triton has no code
# for "forbidden" either: a request without it is a client's error, INVALID_ARG, named, never
# UNAVAILABLE (which clients and load balancers take for a server to retry or to eject).
WIRE: dict[ErrorKind, WireCoding] = {
    ErrorKind.INVALID_INPUT: WireCoding("INVALID_ARG", 400, "INVALID_ARGUMENT", ""),
    ErrorKind.OVERLOADED: WireCoding("UNAVAILABLE", 503, "UNAVAILABLE", "overloaded: "),
    ErrorKind.DEADLINE_EXCEEDED: WireCoding("UNAVAILABLE", 503, "UNAVAILABLE", "deadline_exceeded: "),
    ErrorKind.CANCELLED: WireCoding("CANCELLED", 400, "CANCELLED", "cancelled: "),
    ErrorKind.MODEL_NOT_FOUND: WireCoding("NOT_FOUND", 404, "NOT_FOUND", ""),
    ErrorKind.ENGINE_FAILURE: WireCoding("INTERNAL", 500, "INTERNAL", ""),
    ErrorKind.UNAVAILABLE: WireCoding("UNAVAILABLE", 503, "UNAVAILABLE", ""),
    ErrorKind.ACCESS_DENIED: WireCoding("INVALID_ARG", 400, "INVALID_ARGUMENT", "access_denied: "),
}

# Statuses no served model sends that reach clients all the same.
TRANSPORT_STATUSES: dict[tuple[Protocol, int | str], ErrorKind] = {
    ("grpc", "DEADLINE_EXCEEDED"): ErrorKind.DEADLINE_EXCEEDED,  # the client's own call deadline passed
    ("http", 403): ErrorKind.ACCESS_DENIED,  # tritonserver's refusal of an administrative API (server/launcher.py)
}

# How tritonserver words the refusals it makes itself, before a request reaches the model, with
# codes that do not say what happened: a name it does not serve is INVALID_ARG or NOT_FOUND or
# UNAVAILABLE (model_repository_manager.cc); a restricted API called without its header is HTTP
# 403 but gRPC UNAVAILABLE.
UNKNOWN_MODEL = "Request for unknown model"
RESTRICTED_API_REFUSAL = "is restricted, expecting header"


def triton_error(error: ServingError) -> tuple[str, str]:
    """The Triton error code (a ``pb_utils.TritonError`` attribute name) and message that carry ``error``."""
    coding = WIRE[error.kind]
    return coding.triton_code, coding.prefix + error.message


def triton_refusal(message: str) -> ServingError | None:
    """The typed error of a refusal tritonserver made itself, or None."""
    if UNKNOWN_MODEL in message:
        return ModelNotFound(message)
    if RESTRICTED_API_REFUSAL in message:
        return AccessDenied(message)
    return None


def error_from_status(protocol: Protocol, status: int | str, message: str) -> ServingError | None:
    """The typed error a client received as ``status`` (an HTTP status, or a gRPC status code name)
    and ``message``; None for a status that says nothing of ours (the caller decides)."""
    refusal = triton_refusal(message)
    if refusal is not None:
        return refusal
    kinds = [kind for kind, coding in WIRE.items() if coding.status(protocol) == status]
    for kind in kinds:
        prefix = WIRE[kind].prefix
        if prefix and message.startswith(prefix):
            return error_from_kind(kind, message[len(prefix):])
    # A status one kind alone travels with is that kind, named or not (gRPC CANCELLED from the
    # client's own cancel); among kinds sharing a status, the one without a prefix.
    unnamed = [kind for kind in kinds if len(kinds) == 1 or not WIRE[kind].prefix]
    if unnamed:
        return error_from_kind(unnamed[0], message)
    kind = TRANSPORT_STATUSES.get((protocol, status))
    return None if kind is None else error_from_kind(kind, message)
