"""TLS on gRPC and HTTPS, and the access token, against the real server: the client library,
the CLI and a plain KServe client see the same rules."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from pydantic import SecretStr

from clients import PatentClassifier
from core.access_token import TOKEN_ENV
from core.errors import AccessDenied, ServerUnavailable
from core.synthetic_patents import synthetic_patents
from server.launcher import LaunchConfig, _command, describe_command
from tests.conftest import EXAMPLE_PATENTS, MODEL_NAME, PROJECT_ROOT, example_records

pytestmark = pytest.mark.server  # a tritonserver behind TLS and the token

PROTOCOLS = ["grpc", "http"]
DOCUMENT = synthetic_patents(1, seed=21, long_share=0.0)[0]


def url(secure, protocol: str) -> str:
    return secure.server.grpc_url if protocol == "grpc" else secure.server.http_url


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_and_token_give_the_models_answer(secure_server, reference, protocol):
    with PatentClassifier(url(secure_server, protocol), protocol, MODEL_NAME, tls_ca=secure_server.certificates.ca,
                          token=secure_server.token) as client:
        assert client.is_ready()
        answer = client.classify(DOCUMENT)
    expected, token_count = reference.probabilities(DOCUMENT.render())
    assert answer.labels[0].code == reference.labels.codes[int(expected.argmax())]
    reference.assert_matches(DOCUMENT.render(), np.array([answer.labels[0].probability]), classes=[int(expected.argmax())])
    assert answer.token_count == token_count


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("token", [None, "wrong-token-0123456789"], ids=["no-token", "wrong-token"])
def test_inference_without_the_token_is_refused(secure_server, protocol, token):
    with PatentClassifier(url(secure_server, protocol), protocol, MODEL_NAME, tls_ca=secure_server.certificates.ca,
                          token=token) as client:
        assert client.is_ready()  # health and metadata stay open for probes
        with pytest.raises(AccessDenied, match="requires an access token"):
            client.classify(DOCUMENT)


def test_https_without_the_token_is_403_and_the_repository_api_is_closed_too(secure_server):
    import ssl

    context = ssl.create_default_context(cafile=str(secure_server.certificates.ca))
    body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["특허"]}]}).encode()
    base = f"https://{secure_server.server.http_url}"
    for path, data in ((f"/v2/models/{MODEL_NAME}/infer", body), (f"/v2/repository/models/{MODEL_NAME}/unload", b"{}")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(base + path, data=data, method="POST"), timeout=30, context=context)
        assert refused.value.code == 403
    with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=30, context=context) as answer:
        assert answer.status == 200
    request = urllib.request.Request(base + f"/v2/models/{MODEL_NAME}/infer", data=body, method="POST",
                                     headers={"authorization": f"Bearer {secure_server.token}"})
    with urllib.request.urlopen(request, timeout=60, context=context) as answer:
        assert json.loads(answer.read())["outputs"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_server_certificate_from_another_ca_is_not_trusted(secure_server, protocol):
    with PatentClassifier(url(secure_server, protocol), protocol, MODEL_NAME, tls_ca=secure_server.certificates.other_ca,
                          token=secure_server.token, timeout_s=10) as client:
        assert not client.is_ready()
        with pytest.raises(ServerUnavailable):
            client.classify(DOCUMENT)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plaintext_clients_get_no_answer_from_the_tls_ports(secure_server, protocol):
    with PatentClassifier(url(secure_server, protocol), protocol, MODEL_NAME, token=secure_server.token, timeout_s=10) as client:
        assert not client.is_ready()
        with pytest.raises(ServerUnavailable):
            client.classify(DOCUMENT)


def without_ids(output: str) -> list[dict]:
    return [{key: value for key, value in json.loads(line).items() if key != "prediction_id"} for line in output.splitlines()]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_takes_the_ca_and_the_token_file(secure_server, protocol):
    command = [sys.executable, "-m", "clients", "classify", "--input", str(EXAMPLE_PATENTS), "--quiet",
               "--url", url(secure_server, protocol), "--protocol", protocol, "--tls-ca", str(secure_server.certificates.ca)]
    environment = {key: value for key, value in os.environ.items() if key != TOKEN_ENV}
    with_token = subprocess.run(command + ["--token-file", str(secure_server.token_file)], cwd=PROJECT_ROOT,
                                capture_output=True, text=True, timeout=120, env=environment)
    assert with_token.returncode == 0, with_token.stderr
    lines = [json.loads(line) for line in with_token.stdout.splitlines()]
    assert len(lines) == len(example_records()) and all(len(line["labels"]) == 5 for line in lines)

    from_environment = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
                                      env={**environment, TOKEN_ENV: secure_server.token})
    # The same answers; each answer's prediction_id is its own.
    assert without_ids(from_environment.stdout) == without_ids(with_token.stdout)

    # Without the token every request would be refused: one message and exit 3, not an error line per patent.
    without = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120, env=environment)
    assert without.returncode == 3 and without.stdout == ""
    assert "the server requires an access token (--token-file or $PATENT_CLASSIFIER_TOKEN)" in without.stderr


def test_the_token_never_appears_in_the_logged_command(secure_server, tmp_path):
    config = LaunchConfig(model_repository=tmp_path, token=SecretStr(secure_server.token))
    command = _command(config)
    assert any(secure_server.token in argument for argument in command)  # Triton needs it ...
    assert secure_server.token not in describe_command(command)  # ... the log does not
    assert secure_server.token not in repr(config)


def test_serve_refuses_a_short_token(exported):
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model-repository", str(exported.repository)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, TOKEN_ENV: "short"},
    )
    assert result.returncode == 2 and f"${TOKEN_ENV}: the token has 5 characters; it needs at least 16" in result.stderr


def test_a_client_that_leaves_before_the_answer_closes_the_relays_connection_to_triton(tmp_path):
    """A request Triton never answers (held by a dead stub): when its HTTPS client gives up, the
    TLS front closes its connection to Triton too, so neither the relay nor that connection stays."""
    import asyncio
    import socket
    import ssl
    import threading

    from server.launcher import free_loopback_ports
    from server.tls_front import TlsFront, server_tls_context
    from tests.tls_certificates import write_test_certificates
    from tests.waiting import wait_until

    certificates = write_test_certificates(tmp_path / "certificates")
    backend_port, front_port = free_loopback_ports(2)
    silent_triton = socket.create_server(("127.0.0.1", backend_port))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent_triton.accept()[0]), daemon=True).start()
    front = TlsFront("127.0.0.1", front_port, backend_port,
                     server_tls_context(certificates.server_certificate, certificates.server_key)).start()

    async def leave_unanswered():
        context = ssl.create_default_context(cafile=str(certificates.ca))
        reader, writer = await asyncio.open_connection("127.0.0.1", front_port, ssl=context, server_hostname="localhost")
        writer.write(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)  # the deadline: Triton never answers
        writer.close()
        await writer.wait_closed()

    try:
        asyncio.run(leave_unanswered())
        wait_until(lambda: front.open_connections == 0, "the relay ended", timeout_s=10)
        [triton_side] = accepted
        triton_side.settimeout(10)
        received = b""
        while chunk := triton_side.recv(4096):  # b"" once the front has closed its end
            received += chunk
        assert received.endswith(b"{}")
    finally:
        front.stop()
        silent_triton.close()
