"""TLS on gRPC and HTTPS, and the access token, against the real server: the client library,
the CLI and a plain KServe client see the same rules."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psycopg
import pytest
import tritonclient.grpc as grpcclient

from benchmarks.postgres_server import PostgresServer
from patent_classifier_client import PatentClassifier
from patent_classifier_client.access_token import TOKEN_ENV
from patent_classifier_client.errors import AccessDenied, ServerUnavailable
from patent_classifier_client.feedback_protocol import FEEDBACK_MODEL
from core.serving_config import FeedbackConfig, ServingConfig
from core.synthetic_patents import synthetic_patents
from export.triton_package import write_feedback_model, write_triton_model
from server.launcher import free_loopback_ports
from tests.conftest import EXAMPLE_PATENTS, MAX_LENGTH, MODEL_NAME, PROJECT_ROOT, example_records
from tests.waiting import wait_until

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


def test_https_without_the_token_is_refused_and_the_repository_api_is_closed_even_with_it(secure_server):
    import ssl

    context = ssl.create_default_context(cafile=str(secure_server.certificates.ca))
    body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["특허"]}]}).encode()
    base = f"https://{secure_server.server.http_url}"
    token = {"authorization": f"Bearer {secure_server.token}"}
    for path, data, headers, status, says in (
        (f"/v2/models/{MODEL_NAME}/infer", body, {}, 400, "access_denied: the request carries no access token"),
        (f"/v2/repository/models/{MODEL_NAME}/unload", b"{}", {}, 403, "This API is restricted"),
        (f"/v2/repository/models/{MODEL_NAME}/unload", b"{}", token, 403, "This API is restricted"),
    ):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(base + path, data=data, method="POST", headers=headers),
                                   timeout=30, context=context)
        assert refused.value.code == status and says in refused.value.read().decode()
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
    command = [sys.executable, "-m", "patent_classifier_client", "classify", "--input", str(EXAMPLE_PATENTS), "--quiet",
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

    from server.tls_front import TlsFront, server_tls_context
    from tests.tls_certificates import write_test_certificates

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


# The records settings at serve time (notes/OWNERS.md, docs/feedback.md): the database's URL holds
# no password; the password comes from a file, as a mounted Kubernetes Secret gives it.
RECORDS_DATABASE_ENV = "PATENT_CLASSIFIER_RECORDS_DATABASE"
RECORDS_PASSWORD_FILE_ENV = "PATENT_CLASSIFIER_RECORDS_PASSWORD_FILE"


def _command_lines() -> dict[int, bytes]:
    lines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:  # exited while we looked
                pass
    return lines


@pytest.mark.tools  # a real PostgreSQL
def test_no_process_argv_and_no_served_config_holds_a_secret(exported, tmp_path):
    """`python -m server` with the access token from a file and a records database whose password
    comes from a file: neither secret is in any process's command line (the launcher's, tritonserver's,
    the stubs') nor in any model configuration Triton serves, over HTTP or gRPC. Both reached the
    models: inference needs the token, and a correction was checked against a prediction record in
    a PostgreSQL that takes only that password."""
    token, password = f"token-{secrets.token_hex(12)}", f"password-{secrets.token_hex(12)}"
    with PostgresServer(password=password) as database:
        url = database.create_database("secret_records")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):  # no other way in
            psycopg.connect(url, password="not-the-password", connect_timeout=10).close()
        repository = tmp_path / "model_repository"
        write_triton_model(repository, MODEL_NAME, ServingConfig(
            model_dir=exported.merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=4096, device="cpu",
            prediction_records="hash", records_database=url,
        ))
        write_feedback_model(repository, FeedbackConfig(records_database=url))
        (tmp_path / "token").write_text(token, encoding="utf-8")
        (tmp_path / "records-password").write_text(password, encoding="utf-8")
        environment = {key: value for key, value in os.environ.items() if key not in (TOKEN_ENV, "PGPASSWORD")}
        environment.update({RECORDS_DATABASE_ENV: url, RECORDS_PASSWORD_FILE_ENV: str(tmp_path / "records-password")})
        http_port, grpc_port, metrics_port = free_loopback_ports(3)
        log_path = tmp_path / "server.log"
        with log_path.open("wb") as log:
            launcher = subprocess.Popen(
                [sys.executable, "-m", "server", "--model-repository", str(repository), "--token-file", str(tmp_path / "token"),
                 "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                 "--exit-timeout", "5"],
                cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment,
            )
        try:
            wait_until(lambda: launcher.poll() is not None or "ready in " in log_path.read_text(errors="replace"),
                       "the server ready", timeout_s=300, interval_s=0.5)
            assert launcher.poll() is None, log_path.read_text(errors="replace")[-3000:]
            _assert_both_secrets_reached_the_models(token, grpc_port, http_port)
            _assert_no_argv_and_no_served_config_holds(token, password, repository, grpc_port, http_port)
            assert token not in log_path.read_text(errors="replace") and password not in log_path.read_text(errors="replace")
        finally:
            launcher.terminate()
            code = launcher.wait(timeout=60)
    assert code == 0, log_path.read_text(errors="replace")[-3000:]


def _assert_both_secrets_reached_the_models(token: str, grpc_port: int, http_port: int) -> None:
    with PatentClassifier(f"127.0.0.1:{grpc_port}", "grpc", MODEL_NAME, token=token) as client:
        answer = client.classify(DOCUMENT)
        # The feedback model finds the answer's record in the database: both signed in with the password.
        assert client.submit_feedback(answer.prediction_id, answer.labels[0].code) == "correct"
    with PatentClassifier(f"127.0.0.1:{http_port}", "http", MODEL_NAME) as anonymous:
        with pytest.raises(AccessDenied):
            anonymous.classify(DOCUMENT)


def _assert_no_argv_and_no_served_config_holds(token: str, password: str, repository: Path, grpc_port: int, http_port: int) -> None:
    command_lines = _command_lines()
    ours = [line for line in command_lines.values() if str(repository).encode() in line]
    assert len(ours) >= 3, "the launcher, tritonserver and the stubs, all looked at"
    for pid, line in command_lines.items():
        assert token.encode() not in line and password.encode() not in line, (pid, line.replace(b"\0", b" ")[:300])
    served = {}
    grpc_client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        for model in (MODEL_NAME, FEEDBACK_MODEL):
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/models/{model}/config", timeout=30) as answer:
                served[f"HTTP {model}"] = answer.read().decode()
            served[f"gRPC {model}"] = json.dumps(grpc_client.get_model_config(model, as_json=True))
    finally:
        grpc_client.close()
    assert "secret_records" in served[f"HTTP {FEEDBACK_MODEL}"]  # the configuration names the database ...
    for where, text in served.items():
        assert token not in text and password not in text, where  # ... and holds neither secret
