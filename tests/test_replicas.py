"""Clients over several replicas: two real tritonservers on loopback, the client given both.
The load spreads over them; when one is killed mid-run every request is still answered, by the
other, within its deadline; no attempt outlives the caller's deadline; the CLI with one dead
address answers every line."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from patent_classifier_client import AsyncPatentClassifier, PatentClassifier
from patent_classifier_client.batch_classification import ServerAddress, classify_in_batches
from patent_classifier_client.replicas import FIRST_PAUSE_S, MAX_ATTEMPTS, MAX_PAUSE_S, Attempts, Replica, RetryBudget
from patent_classifier_client.errors import (
    AccessDenied, DeadlineExceeded, EngineFailure, InvalidInput, ModelNotFound, Overloaded, ServerUnavailable,
)
from patent_classifier_client.protocol import Classification
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from export.triton_package import write_triton_model
from server.engine_hold import HOLD_FILE_ENV
from server.launcher import LaunchConfig, TritonServer, free_loopback_ports
from server.model_watchdog import stub_processes
from tests.conftest import EXAMPLE_PATENTS, MAX_LENGTH, MODEL_NAME, PROJECT_ROOT
from tests.test_monitoring import scrape, value

SHORT = synthetic_patents(40, seed=61, long_share=0.0)
TIMEOUT_S = 60.0  # each request's deadline
SPREAD_SHARE = 0.3  # each replica's least share of the requests


def replica_repository(folder: Path, merged_dir: Path) -> Path:
    """The Gemma-2 demo, one thread per replica (two servers share this machine's cores)."""
    repository = folder / "model_repository"
    write_triton_model(repository, MODEL_NAME, ServingConfig(
        model_dir=merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=4 * MAX_LENGTH, device="cpu", cpu_threads=1,
    ))
    return repository


@contextlib.contextmanager
def replica(repository: Path, folder: Path, address: str, ports: tuple[int, int, int], name: str = "", **settings):
    """A running replica (``settings``: more LaunchConfig fields). Its stub process outlives a
    tritonserver that is SIGKILLed, or that gives up unloading at its exit timeout (a busy
    machine); whatever of it is left is ended here."""
    http_port, grpc_port, metrics_port = ports
    config = LaunchConfig(
        model_repository=repository, address=address, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
        backend_directory=folder / "backends", ready_timeout_s=180, **settings,
    )
    with TritonServer(config, log_path=folder / f"tritonserver-{name or address}.log") as server:
        stubs = stub_processes(server.process.pid)
        yield server
    for stub in stubs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stub.pid, signal.SIGKILL)


def ports_free_on(*others: str) -> tuple[int, int, int]:
    """Three ports free on 127.0.0.1 and on each of the ``others`` loopback addresses, so replicas
    listen on the same ports (as pods behind one headless Service do), each on its own address."""
    while True:
        ports = tuple(free_loopback_ports(3))
        sockets = [socket.socket() for _ in ports for _ in others]
        try:
            for sock, (port, other) in zip(sockets, [(port, other) for port in ports for other in others]):
                sock.bind((other, port))
            return ports
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()


@pytest.fixture(scope="module")
def replica_folder(exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    return folder, replica_repository(folder, exported.merged_dir)


@pytest.fixture(scope="module")
def replicas(replica_folder):
    """Two replicas on 127.0.0.1 and 127.0.0.2, on the same ports."""
    folder, repository = replica_folder
    ports = ports_free_on("127.0.0.2")
    with replica(repository, folder, "127.0.0.1", ports) as first, replica(repository, folder, "127.0.0.2", ports) as second:
        yield first, second


def answered(server: TritonServer) -> float:
    """Requests the replica computed (Triton's own count)."""
    samples, _ = scrape(server.metrics_url)
    return value(samples, "nv_inference_count", version="1")


def answered_once_counted(servers, total: float) -> list[float]:
    """Each replica's count, once their sum has reached ``total`` (or after 10 s): Triton counts a
    request as it releases it, which may trail the answer the client already holds."""
    deadline = time.monotonic() + 10
    while sum(counts := [answered(server) for server in servers]) < total and time.monotonic() < deadline:
        time.sleep(0.05)
    return counts


def urls(servers, protocol: str) -> str:
    return ",".join(server.grpc_url if protocol == "grpc" else server.http_url for server in servers)


def assert_spread(replicas, before: list[int]) -> None:
    """SHORT was answered once in all, and each replica answered at least SPREAD_SHARE of it."""
    done = [after - count for after, count in zip(answered_once_counted(replicas, sum(before) + len(SHORT)), before)]
    assert sum(done) == len(SHORT)
    assert min(done) >= SPREAD_SHARE * len(SHORT), done


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_client_spreads_requests_over_both_replicas(replicas, protocol):
    before = [answered(server) for server in replicas]
    address = ServerAddress(urls(replicas, protocol), protocol, MODEL_NAME, TIMEOUT_S)
    batches = classify_in_batches(enumerate(SHORT), address, batch_size=1, concurrency=4)
    answers = [answer for batch in batches for _, answer in batch]

    assert all(isinstance(answer, Classification) for answer in answers)
    assert_spread(replicas, before)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_asyncio_client_spreads_requests_too(replicas, protocol):
    before = [answered(server) for server in replicas]

    async def run():
        async with AsyncPatentClassifier(urls(replicas, protocol), protocol, MODEL_NAME, timeout_s=TIMEOUT_S) as client:
            assert await client.is_ready()
            return await asyncio.gather(*(client.classify(document) for document in SHORT))

    assert len(asyncio.run(run())) == len(SHORT)
    assert_spread(replicas, before)


@pytest.mark.server
def test_a_grpc_target_of_several_addresses_is_balanced_by_grpc(replicas):
    """gRPC's own target syntax, as a headless Service's dns:/// name resolves: one channel, round_robin."""
    first, second = replicas
    assert first.config.grpc_port == second.config.grpc_port
    before = [answered(server) for server in replicas]
    target = f"ipv4:127.0.0.1:{first.config.grpc_port},127.0.0.2:{second.config.grpc_port}"
    with PatentClassifier(target, model=MODEL_NAME, timeout_s=TIMEOUT_S) as client:
        answers = [client.classify(document) for document in SHORT]
    assert len(answers) == len(SHORT)
    assert_spread(replicas, before)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_dns_name_reaches_the_replicas_it_resolves_to(replicas, protocol):
    first, _ = replicas
    port = first.config.grpc_port if protocol == "grpc" else first.config.http_port
    with PatentClassifier(f"dns:///localhost:{port}", protocol, MODEL_NAME, timeout_s=TIMEOUT_S) as client:
        assert client.is_ready()
        assert client.classify(SHORT[0]).token_count > 0


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_model_no_replica_has_is_model_not_found(replicas, protocol):
    with PatentClassifier(urls(replicas, protocol), protocol, "no-such-model", timeout_s=TIMEOUT_S) as client:
        with pytest.raises(ModelNotFound):
            client.classify(SHORT[0])


@pytest.fixture
def victim(replica_folder, tmp_path, monkeypatch):
    """A third replica, killed by the test that uses it, with an engine hold of its own
    (server/engine_hold.py): while its file exists the victim's engine takes no batch."""
    folder, repository = replica_folder
    hold = tmp_path / "victim-hold"
    with contextlib.ExitStack() as running:
        with monkeypatch.context() as patch:
            patch.setenv(HOLD_FILE_ENV, str(hold))  # read by the victim's engine when it starts, by no other
            server = running.enter_context(replica(repository, folder, "127.0.0.1", tuple(free_loopback_ports(3)), name="victim"))
        yield server, hold


@pytest.mark.server
def test_killing_a_replica_mid_run_loses_no_request(replicas, victim):
    survivor, _ = replicas
    victim, hold = victim
    initially = sum(answered(server) for server in (survivor, victim))
    with PatentClassifier(f"{survivor.grpc_url},{victim.grpc_url}", model=MODEL_NAME, timeout_s=TIMEOUT_S) as client:
        client.classify(SHORT[0])  # learns the model's configuration: each later call is one inference, in turn
        before = answered_once_counted((survivor, victim), initially + 1)[0]

        def classify(document):
            started = time.monotonic()
            answer = client.classify(document)
            return answer, time.monotonic() - started

        hold.touch()  # what the client sends the victim now stays queued there
        with ThreadPoolExecutor(4) as pool:
            # Four calls in turn: two to the survivor, answered; two held on the victim.
            first_four = [pool.submit(classify, document) for document in SHORT[1:5]]
            two_answered = time.monotonic() + TIMEOUT_S
            while sum(future.done() for future in first_four) < 2 and time.monotonic() < two_answered:
                time.sleep(0.01)
            assert sum(future.done() for future in first_four) == 2 and victim.process.poll() is None
            os.kill(victim.process.pid, signal.SIGKILL)
            rest = [pool.submit(classify, document) for document in SHORT[5:25]]
            outcomes = [future.result() for future in first_four + rest]

    assert len(outcomes) == 24
    assert all(isinstance(answer, Classification) and seconds < TIMEOUT_S for answer, seconds in outcomes)
    # Every one of them, the two the victim held included, was computed by the survivor.
    assert answered_once_counted([survivor], before + 24)[0] - before == 24


class SlowCloser:
    """A replica that takes every connection and closes it after ``delay_s`` without an answer:
    each attempt on it fails, retryably, but only late."""

    def __init__(self, delay_s: float):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.address = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self._delay_s = delay_s
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:  # closed by close()
                return
            closer = threading.Timer(self._delay_s, connection.close)
            closer.daemon = True
            closer.start()

    def close(self) -> None:
        self.socket.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_no_attempt_outlives_the_callers_deadline(protocol):
    """Two replicas that fail each attempt after 2 s, a caller with a 3 s deadline: the first
    attempt fails at 2 s, the second gets the 1 s left and the call ends at the deadline. An
    attempt given a fresh timeout would end at 4 s at the earliest. (Here the first call a client
    makes, for the model's configuration, is the one that meets them; inferences shrink their
    timeouts the same way: test_the_retry_rules.)"""
    delay_s, timeout_s = 2.0, 3.0
    slow = [SlowCloser(delay_s), SlowCloser(delay_s)]
    try:
        with PatentClassifier(",".join(replica.address for replica in slow), protocol, MODEL_NAME, timeout_s=timeout_s) as client:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                client.classify("특허")
            elapsed = time.monotonic() - started
    finally:
        for replica in slow:
            replica.close()
    assert timeout_s <= elapsed + 0.01 and elapsed < 2 * delay_s


def test_with_every_replica_down_the_error_says_what_was_tried():
    dead = free_loopback_ports(2)
    with PatentClassifier(",".join(f"127.0.0.1:{port}" for port in dead), model=MODEL_NAME, timeout_s=10) as client:
        with pytest.raises(ServerUnavailable) as error:
            client.classify("특허")
    assert "attempt(s)" in error.value.message
    assert all(f"127.0.0.1:{port}" in error.value.message for port in dead)


def test_the_retry_rules():
    """Which typed error goes elsewhere, and after what pause."""
    def call(remaining_s: float | None = 30.0) -> Attempts:
        deadline = None if remaining_s is None else time.monotonic() + remaining_s
        return Attempts([Replica("a:1", None), Replica("b:1", None)], deadline)

    unavailable = call()
    first = unavailable.next_replica()
    assert unavailable.pause_before_retry(first, ServerUnavailable("refused")) == 0.0  # another replica is untried
    assert first.avoid_until > time.monotonic()  # and the failed one goes last for a while
    second = unavailable.next_replica()
    assert second is not first
    assert 0.0 <= unavailable.pause_before_retry(second, ServerUnavailable("reset")) <= FIRST_PAUSE_S  # all tried: a pause

    missing = call()
    assert missing.pause_before_retry(missing.next_replica(), ModelNotFound("loading")) == 0.0
    assert missing.pause_before_retry(missing.next_replica(), ModelNotFound("unknown")) is None  # every replica said so

    overloaded = call()
    pauses = []
    while (pause := overloaded.pause_before_retry(overloaded.next_replica(), Overloaded("queue full"))) is not None:
        pauses.append(pause)
    assert len(pauses) == MAX_ATTEMPTS - 1  # then the error is raised
    assert all(0.0 <= pause <= min(MAX_PAUSE_S, FIRST_PAUSE_S * 2**k) for k, pause in enumerate(pauses))

    for final in (InvalidInput("TEXT[0]", "is empty"), EngineFailure("boom"), DeadlineExceeded("late"), AccessDenied("no token")):
        attempt = call()
        assert attempt.pause_before_retry(attempt.next_replica(), final) is None
    shrunk = call(remaining_s=0.5).attempt_timeouts({"timeout": int(TIMEOUT_S * 1e6), "client_timeout": TIMEOUT_S, "headers": {}})
    assert 0.4e6 < shrunk["timeout"] <= 0.5e6 and 0.4 < shrunk["client_timeout"] <= 0.5 and shrunk["headers"] == {}
    late = call(remaining_s=0.0)
    assert late.pause_before_retry(late.next_replica(), ServerUnavailable("refused")) is None  # no time left


def test_the_retry_budget_holds_retries_back_once_half_its_tokens_are_spent():
    """gRPC's retryThrottling arithmetic: 10 tokens, a failure takes one, an answer gives 0.5 back;
    a retry only while more than 5 remain."""
    budget = RetryBudget(max_tokens=10, token_ratio=0.5)
    assert [budget.failed() for _ in range(6)] == [True, True, True, True, False, False]  # 9, 8, 7, 6 left; then 5, 4
    for _ in range(5):
        budget.succeeded()  # 4 + 5 × 0.5 = 6.5
    assert budget.failed() and not budget.failed()  # 5.5, then 4.5
    for _ in range(100):
        budget.succeeded()
    assert budget.tokens == 10  # never more than the bucket holds

    # A call whose budget is spent raises its first retryable failure, and says why.
    spent = Attempts([Replica("a:1", None), Replica("b:1", None)], None, budget=RetryBudget(max_tokens=2))
    assert spent.pause_before_retry(spent.next_replica(), Overloaded("queue full")) is None
    from tritonclient.utils import InferenceServerException

    raised = spent.final(InferenceServerException(msg="overloaded: queue full", status="StatusCode.UNAVAILABLE"))
    assert raised.message().endswith("[1 attempt(s): a:1; no retry: the retry budget is spent (too many failed attempts lately)]")
    # Errors that are never retried cost no token.
    kept = RetryBudget(max_tokens=2)
    final = Attempts([Replica("a:1", None)], None, budget=kept)
    assert final.pause_before_retry(final.next_replica(), InvalidInput("TEXT[0]", "is empty")) is None and kept.tokens == 2


def test_concurrent_failures_cannot_take_more_retries_than_the_budget_allows():
    """Taking a token and deciding on the retry is one step: 8 threads failing at once get exactly
    the 49 retries a 100-token bucket allows (100 → 51 tokens), however they interleave."""
    budget = RetryBudget(max_tokens=100)
    with ThreadPoolExecutor(8) as pool:
        allowed = sum(pool.map(lambda _: budget.failed(), range(400)))
    assert allowed == 49


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_cli_with_one_dead_address_answers_every_line(replicas, protocol, tmp_path):
    first, _ = replicas
    live = first.grpc_url if protocol == "grpc" else first.http_url
    dead = f"127.0.0.1:{free_loopback_ports(1)[0]}"
    output = tmp_path / "answers.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "patent_classifier_client", "classify", "--input", str(EXAMPLE_PATENTS), "--output", str(output),
         "--url", f"{dead},{live}", "--protocol", protocol, "--model", MODEL_NAME, "--batch-size", "1", "--quiet"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    inputs = [line for line in EXAMPLE_PATENTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == len(inputs)
    assert all("labels" in line and "error" not in line for line in lines)
