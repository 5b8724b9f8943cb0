"""The access rules without a server: the models' token check, the launcher's refusal of a network
address without a token, and a tritonserver command line that holds no token and logs no key.
(tests/test_endpoint_access.py and tests/test_security.py hold them against the real server.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import SecretStr, ValidationError

from patent_classifier_client import access_token
from patent_classifier_client.errors import AccessDenied
from server.launcher import ADMIN_HEADER, LaunchConfig, _command, _environment, describe_command, is_loopback
from server.token_check import TokenCheck
from tests.conftest import PROJECT_ROOT

TOKEN = "a-token-of-the-right-form-0123"


def parameters(*pairs: tuple[str, object]) -> str:
    """Request parameters as Triton hands them to a model: a JSON object, where a name may come twice."""
    return "{" + ",".join(f"{json.dumps(name)}:{json.dumps(value)}" for name, value in pairs) + "}"


@pytest.mark.parametrize("name", ["authorization", "Authorization", "triton-grpc-protocol-authorization"])
def test_the_token_passes_under_each_name_triton_forwards(name):
    TokenCheck(TOKEN).check(parameters((name, f"Bearer {TOKEN}")))
    TokenCheck(TOKEN).check(parameters((name, f"bearer {TOKEN}")))  # the scheme's case does not matter (RFC 7235)


@pytest.mark.parametrize("carried, problem", [
    ((), "carries no access token"),
    ((("x-authorization", f"Bearer {TOKEN}"),), "carries no access token"),  # a name Triton does not forward
    ((("authorization", f"Bearer {TOKEN}x"),), "is not this server's"),
    ((("authorization", TOKEN),), "is not this server's"),  # no scheme
    ((("authorization", f"Basic {TOKEN}"),), "is not this server's"),
    ((("authorization", 12345),), "is not this server's"),
    # A header and a parameter of the same name: both must be the token.
    ((("authorization", "Bearer a-wrong-token-0123456789"), ("authorization", f"Bearer {TOKEN}")), "is not this server's"),
], ids=["none", "other-name", "wrong", "no-scheme", "other-scheme", "not-text", "one-of-two-wrong"])
def test_a_request_without_the_token_is_access_denied(carried, problem):
    with pytest.raises(AccessDenied, match=problem):
        TokenCheck(TOKEN).check(parameters(*carried))


def test_without_a_token_every_request_passes_and_the_token_comes_from_the_environment(monkeypatch):
    TokenCheck(None).check(parameters())
    monkeypatch.delenv(access_token.TOKEN_ENV, raising=False)
    TokenCheck.from_environment().check("{}")
    monkeypatch.setenv(access_token.TOKEN_ENV, TOKEN)
    with pytest.raises(AccessDenied):
        TokenCheck.from_environment().check("{}")
    monkeypatch.setenv(access_token.TOKEN_ENV, "short")  # the model does not load with a token it cannot use
    with pytest.raises(access_token.TokenError):
        TokenCheck.from_environment()


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("patents.internal", False),
])
def test_a_network_address_needs_a_token_or_the_opt_out(tmp_path, address, loopback):
    assert is_loopback(address) is loopback
    if loopback:
        LaunchConfig(model_repository=tmp_path, address=address)
        return
    with pytest.raises(ValidationError) as refused:
        LaunchConfig(model_repository=tmp_path, address=address)
    message = str(refused.value)
    assert f"--address {address} serves a network" in message
    assert "--token-file" in message and f"${access_token.TOKEN_ENV}" in message and "--insecure-no-token" in message
    LaunchConfig(model_repository=tmp_path, address=address, token=SecretStr(TOKEN))
    LaunchConfig(model_repository=tmp_path, address=address, insecure_no_token=True)


def test_the_token_is_on_no_command_line_and_the_launch_key_is_not_logged(tmp_path, monkeypatch):
    key = "the-launch-key-0123456789abcdef"
    monkeypatch.setenv(access_token.TOKEN_ENV, "a-token-the-launcher-did-not-take-0123")
    for token in (None, TOKEN):
        config = LaunchConfig(model_repository=tmp_path, tritonserver=sys.executable, token=SecretStr(token) if token else None)
        command = _command(config, key)
        assert not any(TOKEN in argument for argument in command)
        # The administrative APIs are closed whether or not there is a token ...
        assert f"--http-restricted-api=model-repository,shared-memory,trace,logging:{ADMIN_HEADER}={key}" in command
        assert f"--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:{ADMIN_HEADER}={key}" in command
        assert key not in describe_command(command)  # ... by a key the log does not show
        # The models read the launcher's token, or none, from their environment, never another's.
        assert _environment(config).get(access_token.TOKEN_ENV) == token
        forwarded = [argument for argument in command if "header-forward-pattern" in argument]
        assert forwarded == ([f"--http-header-forward-pattern={access_token.FORWARD_PATTERN}",
                              f"--grpc-header-forward-pattern={access_token.FORWARD_PATTERN}"] if token else [])
        assert TOKEN not in repr(config)


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_serve_on_a_network_address_without_a_token_exits_before_it_starts_anything(tmp_path, address):
    """`python -m server --address 0.0.0.0` with no token: exit code 2 and the two ways out, and no
    tritonserver started (its repository here has nothing Triton could load)."""
    (tmp_path / "a-model").mkdir()
    (tmp_path / "a-model" / "config.pbtxt").write_text('name: "a-model"\n', encoding="utf-8")
    environment = {key: value for key, value in os.environ.items() if key != access_token.TOKEN_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "server", "--model-repository", str(tmp_path), "--address", address],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, env=environment,
    )
    assert result.returncode == 2, result.stderr
    assert f"--address {address} serves a network, and no access token is set" in result.stderr
    assert f"Give a token (--token-file FILE, or ${access_token.TOKEN_ENV})" in result.stderr
    assert "say so with --insecure-no-token" in result.stderr
    assert "server.launcher: starting" not in result.stderr and result.stdout == ""
