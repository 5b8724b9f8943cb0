"""The access-token check of every Triton model of ours: a request without the server's token is
refused before anything of it is decoded.

tritonserver hands a request's ``authorization`` header (over gRPC, its metadata) to the model as
a request parameter: the launcher's ``--http-header-forward-pattern`` and
``--grpc-header-forward-pattern`` (``patent_classifier_client.access_token.FORWARD_PATTERN``). The token itself comes
from the stub's environment, ``$PATENT_CLASSIFIER_TOKEN``, which the stub inherits from
tritonserver (the launcher puts it there from ``--token-file`` or its own environment): Triton's
own restricted-API options would take it only as a command-line argument, which every user of
the host can read. No token in the environment: the server has none, and every request passes.
"""
from __future__ import annotations

import hmac
import json

from patent_classifier_client import access_token
from patent_classifier_client.errors import AccessDenied

_NAMES = frozenset(access_token.FORWARDED_HEADERS)


class TokenCheck:
    def __init__(self, token: str | None):
        self._token = None if token is None else token.encode()

    @classmethod
    def from_environment(cls) -> "TokenCheck":
        """The token of ``$PATENT_CLASSIFIER_TOKEN`` (a malformed one raises: the model does not load)."""
        return cls(access_token.read_token(None))

    def check(self, parameters: str) -> None:
        """Raises ``AccessDenied`` unless the request carries the token. ``parameters``: the request's
        parameters as Triton hands them (``request.parameters()``, a JSON object), where the forwarded
        headers are; a client may also send the same name as a parameter of its own, so every value
        under those names must be the token."""
        if self._token is None:
            return
        # Pairs, not a dict: a name sent twice (a header and a parameter) must not hide either value.
        pairs = json.loads(parameters or "{}", object_pairs_hook=lambda items: items)
        carried = [value for name, value in pairs if name.lower() in _NAMES]
        if not carried:
            raise AccessDenied(
                f"the request carries no access token; this server requires '{access_token.HEADER}: Bearer <token>' "
                "(an HTTP header, or gRPC metadata)"
            )
        if not all(self._is_the_token(value) for value in carried):
            raise AccessDenied(f"the access token the request carries ('{access_token.HEADER}: Bearer ...') is not this server's")

    def _is_the_token(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        scheme, _, token = value.strip().partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._token)
