"""Every endpoint the server exposes, against the real tritonserver: each HTTP route of Triton and
every method of GRPCInferenceService, called with no credential, with the access token and with
the launch's administrative key, on a server without a token and on one with a token (and TLS).
What each answers is the table of docs/operations.md, which this file reads and holds to it."""
from __future__ import annotations

import base64
import json
import re
import ssl
import struct
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from core.serving_config import ServingConfig
from export.triton_package import write_triton_model
from server.launcher import ADMINISTRATIVE_APIS, LaunchConfig, TritonServer, _wheel_tritonserver_root, free_loopback_ports
from tests.conftest import MAX_LENGTH, MODEL_NAME, PROJECT_ROOT

pytestmark = pytest.mark.server  # every route of two real tritonservers

OPERATIONS_DOC = PROJECT_ROOT / "docs" / "operations.md"

ANYONE = "anyone"
TOKEN_HOLDERS = "token holders"  # anyone, on a server without a token
LAUNCHER = "the launcher"  # the launch's key: the launcher and its watchdog
# Who may call each of Triton's API groups (the names its restricted-API options take).
WHO_MAY_CALL = {
    "health": ANYONE, "metadata": ANYONE, "model-config": ANYONE, "statistics": ANYONE,
    "inference": TOKEN_HOLDERS,
    "model-repository": LAUNCHER, "shared-memory": LAUNCHER, "trace": LAUNCHER, "logging": LAUNCHER,
}

# Triton 2.51's HTTP routes (http_server.cc), as docs/operations.md writes them, by API group.
HTTP_ROUTES = {
    "GET /v2/health/live": "health",
    "GET /v2/health/ready": "health",
    "GET /v2/models/<model>/ready": "health",
    "GET /v2/models/<model>/versions/<version>/ready": "health",
    "GET /v2": "metadata",
    "GET /v2/models/<model>": "metadata",
    "GET /v2/models/<model>/versions/<version>": "metadata",
    "GET /v2/models/<model>/config": "model-config",
    "GET /v2/models/<model>/versions/<version>/config": "model-config",
    "GET /v2/models/stats": "statistics",
    "GET /v2/models/<model>/stats": "statistics",
    "GET /v2/models/<model>/versions/<version>/stats": "statistics",
    "POST /v2/models/<model>/infer": "inference",
    "POST /v2/models/<model>/versions/<version>/infer": "inference",
    "POST /v2/models/<model>/generate": "inference",
    "POST /v2/models/<model>/generate_stream": "inference",
    "POST /v2/repository/index": "model-repository",
    "POST /v2/repository/models/<model>/load": "model-repository",
    "POST /v2/repository/models/<model>/unload": "model-repository",
    "GET /v2/systemsharedmemory/status": "shared-memory",
    "GET /v2/systemsharedmemory/region/<region>/status": "shared-memory",
    "POST /v2/systemsharedmemory/region/<region>/register": "shared-memory",
    "POST /v2/systemsharedmemory/unregister": "shared-memory",
    "POST /v2/systemsharedmemory/region/<region>/unregister": "shared-memory",
    "GET /v2/cudasharedmemory/status": "shared-memory",
    "GET /v2/cudasharedmemory/region/<region>/status": "shared-memory",
    "POST /v2/cudasharedmemory/region/<region>/register": "shared-memory",
    "POST /v2/cudasharedmemory/unregister": "shared-memory",
    "POST /v2/cudasharedmemory/region/<region>/unregister": "shared-memory",
    "GET /v2/trace/setting": "trace",
    "POST /v2/trace/setting": "trace",
    "GET /v2/models/<model>/trace/setting": "trace",
    "POST /v2/models/<model>/trace/setting": "trace",
    "GET /v2/logging": "logging",
    "POST /v2/logging": "logging",
}
# Triton 2.51 forwards no header to the model on its generate routes, so with a token the model
# refuses them whatever the caller sends (docs/operations.md says so).
NO_HEADER_FORWARDING = {"POST /v2/models/<model>/generate", "POST /v2/models/<model>/generate_stream"}

# GRPCInferenceService's methods (tritonclient's service descriptor: the test fails on one it does not know).
GRPC_METHODS = {
    "ServerLive": "health", "ServerReady": "health", "ModelReady": "health",
    "ServerMetadata": "metadata", "ModelMetadata": "metadata",
    "ModelConfig": "model-config", "ModelStatistics": "statistics",
    "ModelInfer": "inference", "ModelStreamInfer": "inference",
    "RepositoryIndex": "model-repository", "RepositoryModelLoad": "model-repository", "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory", "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory", "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory", "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace", "LogSettings": "logging",
}
# gRPC's standard health service, which tritonserver serves beside its own.
GRPC_HEALTH_CHECK = {"grpc.health.v1.Health/Check": "health"}
# What a caller with the key may call without changing anything (the rest of LAUNCHER's are not tried with it).
READ_ONLY = {
    "GET /v2/systemsharedmemory/status", "GET /v2/cudasharedmemory/status", "GET /v2/trace/setting",
    "GET /v2/models/<model>/trace/setting", "GET /v2/logging", "POST /v2/repository/index",
    "RepositoryIndex", "SystemSharedMemoryStatus", "CudaSharedMemoryStatus", "TraceSetting", "LogSettings",
}

# What a load through the repository API would run, were it let through: Triton imports the
# model.py a load request carries.
INTRUDER = "intruder"
INTRUDER_MODEL_PY = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"
INTRUDER_CONFIG = {
    "name": INTRUDER, "backend": "python", "max_batch_size": 0,
    "input": [{"name": "IN", "data_type": "TYPE_STRING", "dims": [1]}],
    "output": [{"name": "OUT", "data_type": "TYPE_STRING", "dims": [1]}],
}
TEXT = "반도체 기판 위에 형성된 트랜지스터 구조"


@dataclass
class Served:
    """A running server and how to call it: plain or TLS, with or without a token."""

    server: TritonServer
    token: str | None
    ca: Path | None  # set: HTTPS and gRPC with TLS, verified against this CA
    marker: Path  # what the intruder's model.py would write

    def http(self, route: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        method, path = route.split(" ", 1)
        path = path.replace("<model>", INTRUDER if route.endswith("/load") else MODEL_NAME)
        path = path.replace("<version>", "1").replace("<region>", "region")
        request = urllib.request.Request(
            f"{'https' if self.ca else 'http'}://{self.server.http_url}{path}", method=method,
            data=self._http_body(route) if method == "POST" else None, headers=headers or {},
        )
        context = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        try:
            with urllib.request.urlopen(request, timeout=120, context=context) as answer:
                return answer.status, answer.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def _http_body(self, route: str) -> bytes:
        if route.endswith("/infer"):
            return json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": [TEXT]}]}).encode()
        if "/generate" in route:
            return json.dumps({"TEXT": [TEXT]}).encode()
        if route.endswith("/load"):
            return json.dumps({"parameters": {
                "config": json.dumps(INTRUDER_CONFIG),
                "file:1/model.py": base64.b64encode(INTRUDER_MODEL_PY.format(marker=str(self.marker)).encode()).decode(),
            }}).encode()
        return b"{}"

    def grpc(self, method: str, metadata: dict[str, str] | None = None) -> tuple[grpc.StatusCode, str]:
        """The call's status and message; a stream's error messages come in its responses, with status OK."""
        if self.ca:
            channel = grpc.secure_channel(self.server.grpc_url, grpc.ssl_channel_credentials(self.ca.read_bytes()))
        else:
            channel = grpc.insecure_channel(self.server.grpc_url)
        with channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            pairs = list((metadata or {}).items())
            try:
                if method in GRPC_HEALTH_CHECK:  # an empty HealthCheckRequest; the answer is not needed here
                    channel.unary_unary(f"/{method}")(b"", metadata=pairs, timeout=120)
                    return grpc.StatusCode.OK, ""
                request = self._grpc_request(method)
                if method == "ModelStreamInfer":
                    answers = list(stub.ModelStreamInfer(iter([request]), metadata=pairs, timeout=120))
                    return grpc.StatusCode.OK, "; ".join(answer.error_message for answer in answers)
                getattr(stub, method)(request, metadata=pairs, timeout=120)
                return grpc.StatusCode.OK, ""
            except grpc.RpcError as error:
                return error.code(), error.details()

    def _grpc_request(self, method: str):
        pb = service_pb2
        if method in ("ModelInfer", "ModelStreamInfer"):
            request = pb.ModelInferRequest(model_name=MODEL_NAME)
            tensor = request.inputs.add(name="TEXT", datatype="BYTES")
            tensor.shape.append(1)
            encoded = TEXT.encode()
            request.raw_input_contents.append(struct.pack("<I", len(encoded)) + encoded)
            return request
        if method == "RepositoryModelLoad":
            model_py = INTRUDER_MODEL_PY.format(marker=str(self.marker)).encode()
            return pb.RepositoryModelLoadRequest(model_name=INTRUDER, parameters={
                "config": pb.ModelRepositoryParameter(string_param=json.dumps(INTRUDER_CONFIG)),
                "file:1/model.py": pb.ModelRepositoryParameter(bytes_param=model_py),
            })
        named = {"ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics"}
        fields = {
            "RepositoryModelUnload": {"model_name": MODEL_NAME},
            "SystemSharedMemoryRegister": {"name": "region", "key": "/region", "byte_size": 64},
            "CudaSharedMemoryRegister": {"name": "region", "byte_size": 64},
            "SystemSharedMemoryUnregister": {"name": "region"}, "CudaSharedMemoryUnregister": {"name": "region"},
        }.get(method, {"name": MODEL_NAME} if method in named else {})
        return getattr(pb, f"{method}Request")(**fields)

    def assert_models_still_served(self) -> None:
        token = {"authorization": f"Bearer {self.token}"} if self.token else None
        status, body = self.http("POST /v2/models/<model>/infer", token)
        assert status == 200 and json.loads(body)["outputs"], body
        status, body = self.http("GET /v2/models/stats")
        assert status == 200 and {entry["name"] for entry in json.loads(body)["model_stats"]} == {MODEL_NAME}, body
        assert not self.marker.exists(), "the model.py of a repository load ran inside the server"


@pytest.fixture(scope="module")
def open_server(exported, tmp_path_factory):
    """The demo model, no token, plain HTTP and gRPC on loopback: what `make serve` starts. Its own
    server: were the repository API open, this module's load and unload would change it."""
    folder = tmp_path_factory.mktemp("open")
    repository = folder / "model_repository"
    write_triton_model(repository, MODEL_NAME, ServingConfig(
        model_dir=exported.merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=4096, device="cpu", dtype="float32"
    ))
    http_port, grpc_port, metrics_port = free_loopback_ports(3)
    config = LaunchConfig(model_repository=repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          backend_directory=folder / "backends", ready_timeout_s=180, exit_timeout_s=5)
    with TritonServer(config, log_path=folder / "tritonserver.log") as running:
        yield Served(running, None, None, folder / "intruder-ran")


@pytest.fixture(scope="module")
def token_server(secure_server, tmp_path_factory):
    return Served(secure_server.server, secure_server.token, secure_server.certificates.ca,
                  tmp_path_factory.mktemp("intruder") / "intruder-ran")


def restricted(status: int | grpc.StatusCode, message: str) -> bool:
    """Triton's own refusal of a restricted API (HTTP 403, gRPC UNAVAILABLE)."""
    return status in (403, grpc.StatusCode.UNAVAILABLE) and "is restricted, expecting header" in message


def refused_for_the_token(status: int | grpc.StatusCode, message: str) -> bool:
    """The model's refusal (server/token_check.py, clients/patent_classifier_client/errors.py's AccessDenied row); a stream
    carries it in its response, with the call's status OK."""
    return status in (400, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK) and "access_denied: " in message


def answered(status: int | grpc.StatusCode, message: str) -> bool:
    return status in (200, grpc.StatusCode.OK) and "access_denied" not in message


# --- the table, and what it covers ---------------------------------------------------------------


def documented_endpoints() -> dict[str, tuple[str, str]]:
    """docs/operations.md's endpoint table: endpoint → (API group, who may call it)."""
    rows = {}
    for line in OPERATIONS_DOC.read_text(encoding="utf-8").splitlines():
        match = re.match(r"\| `([^`]+)` \| ([a-z-]+) \| ([^|]+?) \|", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def test_the_documented_table_is_the_tested_one():
    endpoints = {**HTTP_ROUTES, **GRPC_METHODS, **GRPC_HEALTH_CHECK}
    expected = {endpoint: (group, WHO_MAY_CALL[group]) for endpoint, group in endpoints.items()}
    documented = {endpoint: row for endpoint, row in documented_endpoints().items() if endpoint in expected}
    assert documented == expected


def test_the_table_covers_every_api_group_of_the_binary_and_every_grpc_method():
    """The API groups tritonserver itself names (its --help), and the methods of the service tritonclient speaks."""
    printed = subprocess.run([str(_wheel_tritonserver_root() / "bin" / "tritonserver"), "--help"],
                             capture_output=True, text=True, timeout=60)
    help_text = printed.stdout + printed.stderr
    listed = re.search(r"--http-restricted-api.*?Allowed APIs:(.*?)(?:\n\s*\n|\n\s*--)", help_text, re.DOTALL)
    assert listed, help_text
    groups = {name.strip() for name in listed.group(1).split(",")}
    assert groups == set(WHO_MAY_CALL)
    assert set(HTTP_ROUTES.values()) == set(GRPC_METHODS.values()) == groups
    service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {method.name for method in service.methods} == set(GRPC_METHODS)
    assert set(ADMINISTRATIVE_APIS) == {group for group, who in WHO_MAY_CALL.items() if who == LAUNCHER}


# --- against the real servers --------------------------------------------------------------------


def check_every_endpoint(served: Served, endpoints: dict[str, str], protocol: str) -> None:
    """Each endpoint with no credential and (on a server with one) the token, then the read-only
    administrative ones with the launch key; the model still served after all of it."""
    credentials = {"no credential": None}
    if served.token:
        credentials["the token"] = {"authorization": f"Bearer {served.token}"}
    call = served.http if protocol == "http" else served.grpc
    for endpoint, group in endpoints.items():
        who = WHO_MAY_CALL[group]
        for credential, headers in credentials.items():
            status, message = call(endpoint, headers)
            where = f"{endpoint} with {credential}: {status} {message[:300]}"
            if who == LAUNCHER:
                assert restricted(status, message), where  # a token opens nothing of these
            elif who == ANYONE or served.token is None:
                assert answered(status, message), where
            elif endpoint in NO_HEADER_FORWARDING or headers is None:
                assert refused_for_the_token(status, message), where
            else:
                assert answered(status, message), where
        if who == LAUNCHER and endpoint in READ_ONLY:
            status, message = call(endpoint, served.server.admin_headers(protocol))
            assert not restricted(status, message), f"{endpoint} with the launch key: {status} {message[:300]}"
    served.assert_models_still_served()


@pytest.mark.parametrize("which", ["open_server", "token_server"])
def test_http_routes(which, request):
    check_every_endpoint(request.getfixturevalue(which), HTTP_ROUTES, "http")


@pytest.mark.parametrize("which", ["open_server", "token_server"])
def test_grpc_methods(which, request):
    check_every_endpoint(request.getfixturevalue(which), {**GRPC_METHODS, **GRPC_HEALTH_CHECK}, "grpc")


def test_the_launch_key_opens_the_repository_index_to_the_launcher_alone(open_server):
    """The key works (the restriction is not a broken API), and it is this launch's: the index
    answers with it and lists the served model."""
    status, body = open_server.http("POST /v2/repository/index", open_server.server.admin_headers("http"))
    assert status == 200 and [entry["name"] for entry in json.loads(body)] == [MODEL_NAME], body
    status, _ = open_server.http("POST /v2/repository/index", {"patent-classifier-admin-key": "a-guess-of-the-same-form-0123456789"})
    assert status == 403


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_client_lists_the_served_models_from_statistics_on_one_address_and_on_a_replica_set(open_server, protocol):
    """The repository index is closed to clients: the client library's ready_models reads statistics."""
    from patent_classifier_client import PatentClassifier

    url = open_server.server.grpc_url if protocol == "grpc" else open_server.server.http_url
    for urls in (url, [url, url]):
        with PatentClassifier(urls, protocol, MODEL_NAME) as client:
            assert client.ready_models() == [MODEL_NAME]
