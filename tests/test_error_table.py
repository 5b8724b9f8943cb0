"""The one error table (clients/patent_classifier_client/errors.py): every kind survives the trip through both protocols'
representations and back to the same typed error; the statuses it states are those the real
tritonserver sends; tritonserver's own refusals and the transport's statuses decode as documented."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from patent_classifier_client.patent_classifier import typed_error
from patent_classifier_client.errors import (
    WIRE, AccessDenied, Cancelled, DeadlineExceeded, ErrorKind, InvalidInput, ModelNotFound, ServerUnavailable,
    error_from_kind, error_from_status, triton_error,
)

PROTOCOLS = ("http", "grpc")
# Worded as the server words an InvalidInput, "field: problem", so the field can be checked too.
MESSAGE = "TEXT[0]: answered with this kind on purpose"
ERROR_MODEL = "error-table"
ERROR_MODEL_PY = Path(__file__).parent / "triton_models" / "error_table_model.py"


def grpc_status(name: str) -> str:
    return f"StatusCode.{name}"  # as tritonclient.grpc reports one


def assert_same_error(decoded, sent) -> None:
    assert type(decoded) is type(sent) and decoded.kind is sent.kind
    assert decoded.message == sent.message
    if isinstance(sent, InvalidInput):
        assert (decoded.field, decoded.problem) == (sent.field, sent.problem) == ("TEXT[0]", "answered with this kind on purpose")


# --- the table on its own ------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("kind", list(ErrorKind), ids=lambda kind: kind.value)
def test_every_kind_round_trips_through_the_protocols_status_and_message(kind, protocol):
    sent = error_from_kind(kind, MESSAGE)
    code, message = triton_error(sent)
    assert code == WIRE[kind].triton_code
    status = WIRE[kind].status(protocol)
    assert_same_error(error_from_status(protocol, status, message), sent)
    # The client library decodes the same from what tritonclient raises.
    raised = InferenceServerException(message, str(status) if protocol == "http" else grpc_status(status))
    decoded = typed_error(raised, "127.0.0.1:1", protocol)
    assert decoded.kind is kind and MESSAGE in decoded.message


def test_kinds_that_share_a_status_are_told_apart_by_their_prefix():
    for protocol in PROTOCOLS:
        statuses = {WIRE[kind].status(protocol) for kind in ErrorKind}
        for status in statuses:
            sharing = [kind for kind in ErrorKind if WIRE[kind].status(protocol) == status]
            if len(sharing) > 1:
                unnamed = [kind for kind in sharing if not WIRE[kind].prefix]
                assert len(unnamed) <= 1, (protocol, status, unnamed)
                prefixes = [WIRE[kind].prefix for kind in sharing if WIRE[kind].prefix]
                assert len(set(prefixes)) == len(prefixes)
    # One Triton code, one status per protocol: tritonserver knows nothing but the code.
    for kind in ErrorKind:
        for other in ErrorKind:
            if WIRE[kind].triton_code == WIRE[other].triton_code:
                assert (WIRE[kind].http_status, WIRE[kind].grpc_status) == (WIRE[other].http_status, WIRE[other].grpc_status)


def test_a_message_that_only_looks_named_keeps_its_status_kind():
    # "overloaded: " in front of an HTTP 400 is an InvalidInput whose field happens to be so named.
    decoded = error_from_status("http", 400, "overloaded: is not a field")
    assert isinstance(decoded, InvalidInput) and decoded.field == "overloaded"


@pytest.mark.parametrize("protocol, status", [("http", 404), ("grpc", "NOT_FOUND"), ("http", 400),
                                              ("grpc", "INVALID_ARGUMENT"), ("http", 503), ("grpc", "UNAVAILABLE")])
def test_tritonservers_unknown_model_is_model_not_found_whatever_its_status(protocol, status):
    # 2.51 answers a name it never served with NOT_FOUND; other versions and a model that is not
    # loaded use INVALID_ARG or UNAVAILABLE, always with these words.
    decoded = error_from_status(protocol, status, "Request for unknown model: 'nosuch' is not found")
    assert isinstance(decoded, ModelNotFound) and "'nosuch'" in decoded.message


def test_tritonservers_refusal_of_an_administrative_api_is_access_denied_over_both_protocols():
    http_refusal = "This API is restricted, expecting header 'patent-classifier-admin-key'"
    assert isinstance(error_from_status("http", 403, http_refusal), AccessDenied)
    refused = error_from_status("grpc", "UNAVAILABLE", "This protocol is restricted, expecting header 'triton-grpc-protocol-patent-classifier-admin-key'")
    assert isinstance(refused, AccessDenied)
    # No token opens it: the client says so, rather than asking for one.
    hinted = typed_error(InferenceServerException(http_refusal, "403"))
    assert isinstance(hinted, AccessDenied) and "administrative API" in hinted.message and "--token-file" not in hinted.message
    token_hint = typed_error(InferenceServerException(triton_error(AccessDenied("no token"))[1], "400"), protocol_name="http")
    assert isinstance(token_hint, AccessDenied) and "--token-file" in token_hint.message


def test_the_transports_own_statuses():
    assert isinstance(error_from_status("grpc", "DEADLINE_EXCEEDED", "Deadline Exceeded"), DeadlineExceeded)
    assert isinstance(error_from_status("grpc", "CANCELLED", "Locally cancelled by application!"), Cancelled)
    assert error_from_status("http", 502, "Bad Gateway") is None  # says nothing of ours: the caller decides
    unreachable = typed_error(InferenceServerException("failed to connect to all addresses", grpc_status("UNAVAILABLE")),
                              "127.0.0.1:1", "grpc")
    assert isinstance(unreachable, ServerUnavailable) and "127.0.0.1:1" in unreachable.message
    assert isinstance(typed_error(InferenceServerException("no status at all")), ServerUnavailable)


# --- against the real tritonserver ---------------------------------------------------------------


@pytest.fixture(scope="module")
def error_server(tmp_path_factory):
    """A tritonserver whose one model answers each request with the error its TEXT names."""
    from tests.conftest import start_tritonserver

    repository = tmp_path_factory.mktemp("error_repository")
    (repository / ERROR_MODEL / "1").mkdir(parents=True)
    shutil.copyfile(ERROR_MODEL_PY, repository / ERROR_MODEL / "1" / "model.py")
    (repository / ERROR_MODEL / "config.pbtxt").write_text(
        f'name: "{ERROR_MODEL}"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "TEXT" data_type: TYPE_STRING dims: [ -1 ] } ]\n'
        'output [ { name: "LABELS" data_type: TYPE_STRING dims: [ -1 ] } ]\n',
        encoding="utf-8",
    )
    with start_tritonserver(repository, tmp_path_factory, ready_timeout_s=60) as running:
        yield running


def raised_by_server(server, protocol: str, model: str, text: str) -> InferenceServerException:
    if protocol == "grpc":
        import tritonclient.grpc as transport

        url = server.grpc_url
    else:
        import tritonclient.http as transport

        url = server.http_url
    client = transport.InferenceServerClient(url)
    try:
        tensor = transport.InferInput("TEXT", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
        with pytest.raises(InferenceServerException) as raised:
            client.infer(model, [tensor])
        return raised.value
    finally:
        client.close()  # an open HTTP connection would hold the server's shutdown


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_real_server_sends_each_kind_with_the_tables_status_and_the_client_decodes_it(error_server, protocol):
    for kind in ErrorKind:
        raised = raised_by_server(error_server, protocol, ERROR_MODEL, kind.value)
        coding = WIRE[kind]
        expected = str(coding.http_status) if protocol == "http" else grpc_status(coding.grpc_status)
        assert (kind, raised.status()) == (kind, expected)
        decoded = typed_error(raised, error_server.grpc_url, protocol)
        if kind is ErrorKind.ACCESS_DENIED:  # the client adds how to give a token
            assert isinstance(decoded, AccessDenied) and decoded.message.endswith(coding.prefix + MESSAGE)
        else:
            assert_same_error(decoded, error_from_kind(kind, MESSAGE))


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_real_servers_unknown_model_is_model_not_found(error_server, protocol):
    raised = raised_by_server(error_server, protocol, "no-such-model", ErrorKind.INVALID_INPUT.value)
    decoded = typed_error(raised, error_server.grpc_url, protocol)
    assert isinstance(decoded, ModelNotFound) and "'no-such-model'" in decoded.message
