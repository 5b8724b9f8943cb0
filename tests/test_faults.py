"""The Python backend's stub process is killed under load: requests in flight end with an error
(never a hang), the model reports not-ready, and it comes back without a server restart."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from patent_classifier_client import AsyncPatentClassifier, PatentClassifier
from patent_classifier_client.errors import DeadlineExceeded, EngineFailure, ModelNotFound, ServerUnavailable, ServingError
from core.synthetic_patents import synthetic_patents
from server.model_watchdog import stub_processes
from tests.conftest import MODEL_NAME, held_engines
from tests.test_monitoring import scrape, value
from tests.waiting import until

pytestmark = pytest.mark.server  # stubs killed under load in the real tritonserver

IN_FLIGHT_TIMEOUT_S = 15.0  # the clients' deadline: what bounds a request the dead stub held
RECOVERY_LIMIT_S = 180.0
PATENTS = synthetic_patents(16, seed=31, long_share=1.0)
PROBE = synthetic_patents(1, seed=32, long_share=0.0)[0]


async def timed_outcome(client, document) -> tuple[object, float]:
    """("answered" or the typed error, seconds taken) of one classification."""
    started = time.monotonic()
    try:
        await client.classify(document)
        outcome = "answered"
    except ServingError as error:
        outcome = error
    return outcome, time.monotonic() - started


async def until_answered_again(client, probe, since: float, limit_s: float) -> list[tuple[bool, object]]:
    """(ready, outcome) of ``probe`` every half second, until one is answered on a ready model or
    ``limit_s`` has passed since ``since``: how a model's way back after a fault looks to a client."""
    probes = []
    while time.monotonic() - since < limit_s:
        ready = await client.is_ready()
        outcome, _ = await timed_outcome(client, probe)
        probes.append((ready, outcome))
        if outcome == "answered" and ready:
            break
        await asyncio.sleep(0.5)
    return probes


def test_killing_the_stub_under_load_fails_requests_in_flight_and_the_model_comes_back(secure_server):
    secure = secure_server
    clients = {
        protocol: dict(url=secure.server.grpc_url if protocol == "grpc" else secure.server.http_url, protocol=protocol,
                       model=MODEL_NAME, tls_ca=secure.certificates.ca, token=secure.token)
        for protocol in ("grpc", "http")
    }
    with PatentClassifier(**clients["grpc"]) as client:
        before = client.classify(PROBE)
    [stub] = stub_processes(secure.server.process.pid)
    queued = lambda: value(scrape(secure.server.metrics_url)[0], "pc_queue_documents", model=MODEL_NAME)

    async def scenario():
        async with AsyncPatentClassifier(**clients["grpc"], timeout_s=IN_FLIGHT_TIMEOUT_S) as grpc_client, \
                AsyncPatentClassifier(**clients["http"], timeout_s=IN_FLIGHT_TIMEOUT_S) as http_client:
            await grpc_client.classify(PROBE)
            await http_client.classify(PROBE)

            # Held (server/engine_hold.py): every request is queued in the stub when it dies,
            # however fast the machine would have answered them.
            with held_engines():
                in_flight = [asyncio.ensure_future(timed_outcome(client, document))
                             for document in PATENTS for client in (grpc_client, http_client)]
                await until(lambda: queued() >= len(in_flight), "every request queued in the held stub")
                os.kill(stub.pid, signal.SIGKILL)
                killed_at = time.monotonic()

            # Meanwhile, a caller keeps trying, the way a retrying backend would.
            probes = []
            while time.monotonic() - killed_at < RECOVERY_LIMIT_S:
                ready = await grpc_client.is_ready()
                outcome, _ = await timed_outcome(grpc_client, PROBE)
                probes.append((time.monotonic() - killed_at, ready, outcome))
                if outcome == "answered" and ready:
                    break
                await asyncio.sleep(0.2)
            return await asyncio.gather(*in_flight), probes

    outcomes, probes = asyncio.run(scenario())
    recovered_after_s, _, last = probes[-1]

    # Every request in flight ended, none later than its deadline (plus scheduling slack).
    assert len(outcomes) == 2 * len(PATENTS)
    assert max(seconds for _, seconds in outcomes) < IN_FLIGHT_TIMEOUT_S + 5
    errors = [outcome for outcome, _ in outcomes if outcome != "answered"]
    assert len(errors) == len(outcomes)  # all were in flight
    assert all(isinstance(error, (DeadlineExceeded, EngineFailure, ServerUnavailable)) for error in errors)

    # Callers after the kill saw a typed failure and a not-ready model before the recovery; while
    # the model reloaded, a retryable "unavailable", never "unknown model" (which Triton answers).
    # (Which of the two a probe meets depends on when it comes: "not healthy" only until the
    # watchdog's next look, at most its poll interval after the kill.)
    failures = [outcome for _, _, outcome in probes if outcome != "answered"]
    assert failures and all(
        (isinstance(outcome, EngineFailure) and "not healthy" in outcome.message)
        or (isinstance(outcome, ServerUnavailable) and "not loaded" in outcome.message)
        for outcome in failures
    ), failures
    assert not any(isinstance(outcome, ModelNotFound) for outcome in failures)
    watchdog = secure.server.watchdog.state()
    assert any(not ready for _, ready, _ in probes), f"no reload began within {RECOVERY_LIMIT_S:.0f} s; {watchdog}"
    assert last == "answered", f"the model did not come back within {RECOVERY_LIMIT_S:.0f} s: {probes[-3:]}; {watchdog}"

    # The watchdog reloaded it (a new stub), and the reloaded model gives the same answer.
    [recovery] = [r for r in secure.server.watchdog.recoveries if r.dead_stub_pid == stub.pid]
    assert recovery.ready and recovery.model == MODEL_NAME
    [new_stub] = stub_processes(secure.server.process.pid)
    assert new_stub.pid != stub.pid
    with PatentClassifier(**clients["http"]) as client:
        assert client.classify(PROBE) == before
    kinds = {}
    for error in errors + failures:
        kinds[type(error).__name__] = kinds.get(type(error).__name__, 0) + 1
    print(
        f"\nstub {stub.pid} killed with {len(outcomes)} requests in flight: "
        f"{len(outcomes) - len(errors)} answered, errors by kind (in flight + probes) {kinds}; "
        f"watchdog noticed within {recovery.detected_after_s:.2f} s, reload took {recovery.reload_seconds:.1f} s; "
        f"model answered again {recovered_after_s:.1f} s after the kill"
    )
