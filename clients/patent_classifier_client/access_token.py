"""The shared secret that inference requests must carry, read the same way by server and clients.

The token travels as ``authorization: Bearer <token>``: an HTTP header, or gRPC metadata named
``authorization`` or ``triton-grpc-protocol-authorization`` (the name the client library sends).
tritonserver hands these headers to the served model as request parameters (its header-forward
patterns, set by the launcher), and the model refuses a request without the token
(``server.token_check``); Triton itself never sees the token's value, so it is on no command line.
Server and clients read it from a file or an environment variable, never from an argument, so it
stays out of shell history, ``ps`` and logs.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

HEADER = "authorization"
# The gRPC metadata key the client library sends; the server takes plain "authorization" too.
GRPC_HEADER = f"triton-grpc-protocol-{HEADER}"
# Header (and gRPC metadata) names the server reads the token from, as one regular expression:
# tritonserver's --http-header-forward-pattern / --grpc-header-forward-pattern, which match HTTP
# header names without regard to case.
FORWARDED_HEADERS = (HEADER, GRPC_HEADER)
FORWARD_PATTERN = f"^({'|'.join(re.escape(name) for name in FORWARDED_HEADERS)})$"
TOKEN_ENV = "PATENT_CLASSIFIER_TOKEN"
MIN_TOKEN_CHARACTERS = 16
# RFC 6750's bearer-token characters (without "=" padding): the token travels unchanged as an
# HTTP header value and as gRPC metadata.
_TOKEN_CHARACTERS = re.compile(r"[A-Za-z0-9._~+/-]+")


class TokenError(ValueError):
    pass


def validate_token(token: str, source: str) -> str:
    if len(token) < MIN_TOKEN_CHARACTERS:
        raise TokenError(f"{source}: the token has {len(token)} characters; it needs at least {MIN_TOKEN_CHARACTERS}")
    if not _TOKEN_CHARACTERS.fullmatch(token):
        raise TokenError(f"{source}: the token may hold only letters, digits and . _ ~ + / -")
    return token


def read_token(token_file: Path | None, environment: dict[str, str] | None = None) -> str | None:
    """The token from ``token_file`` (surrounding whitespace ignored) or else ``$PATENT_CLASSIFIER_TOKEN``; None if neither."""
    if token_file is not None:
        try:
            return validate_token(Path(token_file).read_text(encoding="utf-8").strip(), f"--token-file {token_file}")
        except OSError as exc:
            raise TokenError(f"--token-file {token_file}: cannot read it ({exc.strerror})") from None
    value = (os.environ if environment is None else environment).get(TOKEN_ENV, "").strip()
    return validate_token(value, f"${TOKEN_ENV}") if value else None


def header_value(token: str) -> str:
    return f"Bearer {token}"


def request_headers(token: str | None, protocol: str = "http") -> dict[str, str] | None:
    """HTTP headers or gRPC metadata that carry the token (None without a token)."""
    if not token:
        return None
    return {GRPC_HEADER if protocol == "grpc" else HEADER: header_value(token)}
