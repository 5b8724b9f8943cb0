"""A device that stops computing, and a forward pass that hangs, through the real tritonserver:
the engine turns itself dead (health false, ``pc_engine_healthy`` 0), its stub ends
(server/dead_engine_exit.py) after failing what it held, and the watchdog brings the model back.
Before, such a replica stayed READY and answered every request with an error, or none at all.
The faults are injected on the CPU (tests/triton_models/device_fault_model.py)."""
from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from patent_classifier_client import AsyncPatentClassifier, PatentClassifier
from patent_classifier_client.errors import DeadlineExceeded, EngineFailure, ServingError
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from export.triton_package import MODEL_VERSION, write_triton_model
from server.model_watchdog import stub_processes
from tests.conftest import MAX_LENGTH, start_tritonserver
from tests.test_faults import timed_outcome, until_answered_again
from tests.test_monitoring import scrape

pytestmark = pytest.mark.server  # stubs that end themselves in the real tritonserver

MODEL = "device-fault"
FAULT_MODEL_PY = Path(__file__).parent / "triton_models" / "device_fault_model.py"
# The injected hang never returns; the demo's real passes here take milliseconds, far inside this.
MAX_FORWARD_PASS_S = 20.0
CLIENT_TIMEOUT_S = 120.0  # far past the bound and the dead engine's clean-up: an answer before it is the server's
RECOVERY_LIMIT_S = 180.0
PROBE = synthetic_patents(1, seed=61, long_share=0.0)[0]


@pytest.fixture(scope="module")
def fault_server(exported, tmp_path_factory):
    repository = tmp_path_factory.mktemp("device_fault_repository")
    write_triton_model(repository, MODEL, ServingConfig(
        model_dir=exported.merged_dir.resolve(), max_length=MAX_LENGTH, max_batch_tokens=4096, device="cpu",
        dtype="float32", max_forward_pass_s=MAX_FORWARD_PASS_S,
    ))
    shutil.copyfile(FAULT_MODEL_PY, repository / MODEL / MODEL_VERSION / "model.py")
    with start_tritonserver(repository, tmp_path_factory, ready_timeout_s=180) as running:
        running.fault_file = repository / MODEL / MODEL_VERSION / "fault"
        yield running


def engine_healthy_gauge(server) -> float | None:
    samples, _ = scrape(server.metrics_url)
    found = [v for (name, labels), v in samples.items() if name == "pc_engine_healthy" and ("model", MODEL) in labels]
    return found[0] if found else None


def assert_reloaded(server, stub, probes) -> None:
    assert probes[-1] == (True, "answered"), f"the model did not come back within {RECOVERY_LIMIT_S:.0f} s: {probes[-3:]}"
    assert any(not ready for ready, _ in probes), "the model never turned not-ready"
    [recovery] = [r for r in server.watchdog.recoveries if r.dead_stub_pid == stub.pid]
    assert recovery.ready and recovery.model == MODEL


def stub_of_the_model(server):
    [stub] = [stub for stub in stub_processes(server.process.pid) if stub.model == MODEL]
    return stub


def test_a_device_that_stops_computing_ends_its_stub_and_the_model_comes_back(fault_server):
    with PatentClassifier(fault_server.grpc_url, model=MODEL) as client:
        assert client.classify(PROBE).labels
    stub = stub_of_the_model(fault_server)

    async def scenario():
        async with AsyncPatentClassifier(fault_server.grpc_url, model=MODEL, timeout_s=CLIENT_TIMEOUT_S) as client:
            fault_server.fault_file.write_text("sticky")
            failed, _ = await timed_outcome(client, PROBE)
            return failed, await until_answered_again(client, PROBE, time.monotonic(), RECOVERY_LIMIT_S)

    failed, probes = asyncio.run(scenario())
    assert isinstance(failed, EngineFailure) and "illegal memory access" in failed.message, failed
    assert_reloaded(fault_server, stub, probes)


def test_a_forward_pass_that_hangs_past_its_bound_is_answered_and_the_model_comes_back(fault_server):
    with PatentClassifier(fault_server.grpc_url, model=MODEL) as client:
        assert client.classify(PROBE).labels
    stub = stub_of_the_model(fault_server)
    assert engine_healthy_gauge(fault_server) == 1.0

    async def scenario():
        async with AsyncPatentClassifier(fault_server.grpc_url, model=MODEL, timeout_s=CLIENT_TIMEOUT_S) as client:
            fault_server.fault_file.write_text("hang")
            hung = asyncio.ensure_future(timed_outcome(client, PROBE))
            gauges = []
            while not hung.done() and 0.0 not in gauges:  # the stub reports its dead engine before it ends
                gauges.append(await asyncio.to_thread(engine_healthy_gauge, fault_server))
                await asyncio.sleep(0.1)
            outcome, _ = await hung
            return outcome, gauges, await until_answered_again(client, PROBE, time.monotonic(), RECOVERY_LIMIT_S)

    outcome, gauges, probes = asyncio.run(scenario())
    # Failed by the server, which gave up on the pass, not left to the client's own deadline.
    assert isinstance(outcome, ServingError) and not isinstance(outcome, DeadlineExceeded), outcome
    assert 0.0 in gauges, gauges
    assert_reloaded(fault_server, stub, probes)
