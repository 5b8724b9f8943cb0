"""The vLLM engine when something around it fails: a cancellation probe that raises, and vLLM's
engine-core process dying under load (through the real tritonserver: the model turns
not-ready and comes back, and no request in flight waits past its deadline)."""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from clients import AsyncPatentClassifier, PatentClassifier
from core.errors import DeadlineExceeded, EngineFailure, ServerUnavailable
from core.hf_classifier import EncodedText
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from server.model_watchdog import process_tree, stub_processes
from tests.conftest import MAX_LENGTH, VLLM_GEMMA2_MODEL, held_engines
from tests.test_faults import timed_outcome
from tests.test_monitoring import scrape, value
from tests.test_serving import served_probabilities
from tests.waiting import until

pytestmark = pytest.mark.vllm  # vLLM's engine, in this process and behind tritonserver

IN_FLIGHT_TIMEOUT_S = 30.0
RECOVERY_LIMIT_S = 480.0  # a new stub starts a new vLLM engine: the better part of a minute or more on 2 cores
PATENTS = synthetic_patents(12, seed=41, long_share=1.0)
PROBE = synthetic_patents(1, seed=42, long_share=0.0)[0]


class AnsweringAsyncLLM:
    """Stands in for vLLM's AsyncLLM: every request's logits at once."""

    errored = False

    async def encode(self, prompt, pooling_params, request_id):
        yield SimpleNamespace(error=None, outputs=SimpleNamespace(data=torch.tensor([0.5, 1.5, 0.0])))

    def shutdown(self):
        pass


def test_a_cancellation_probe_that_raises_never_leaves_a_request_unanswered():
    from server.vllm_engine import VllmEngine

    engine = VllmEngine(ServingConfig(engine="vllm", model_dir=Path("unused"), max_length=MAX_LENGTH))
    engine._engine = AnsweringAsyncLLM()
    engine._loop_thread = threading.Thread(target=engine._loop.run_forever, daemon=True)
    engine._loop_thread.start()

    def failing_probe() -> bool:
        raise RuntimeError("the caller's probe failed")

    try:
        future: Future = Future()
        engine._loop.call_soon_threadsafe(engine._begin, future, [EncodedText([5, 6, 7], False)], None, failing_probe)
        (scores,) = future.result(timeout=10)  # computed, as the PyTorch engine does when its probe fails
        assert scores.probabilities.argmax() == 1 and scores.token_count == 3
    finally:
        engine._shut_down()


def engine_core_of(stub_pid: int) -> int:
    """The vLLM engine-core process under a stub (vLLM titles it VLLM::EngineCore)."""
    found = []
    for pid, _ in process_tree(stub_pid):
        with contextlib.suppress(OSError):
            if b"EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    assert len(found) == 1, f"expected one engine core under stub {stub_pid}, found {found}"
    return found[0]


def test_the_engine_core_dying_under_load_fails_requests_in_flight_and_the_model_comes_back(vllm_server, reference):
    [stub] = [stub for stub in stub_processes(vllm_server.process.pid) if stub.model == VLLM_GEMMA2_MODEL]
    core = engine_core_of(stub.pid)
    with PatentClassifier(vllm_server.grpc_url, model=VLLM_GEMMA2_MODEL) as client:
        client.classify(PROBE)
    received = lambda: value(scrape(vllm_server.metrics_url)[0], "pc_requests_total", model=VLLM_GEMMA2_MODEL)
    received_before = received()

    async def scenario():
        async with AsyncPatentClassifier(vllm_server.grpc_url, model=VLLM_GEMMA2_MODEL, timeout_s=IN_FLIGHT_TIMEOUT_S) as client:
            # Held before vLLM (server/engine_hold.py): in flight when the core dies, however fast the machine.
            with held_engines():
                in_flight = [asyncio.ensure_future(timed_outcome(client, document)) for document in PATENTS]
                await until(lambda: received() >= received_before + len(PATENTS), "every request received by the held engine")
                os.kill(core, signal.SIGKILL)
                killed_at = time.monotonic()
                # The dead engine fails what it held (stopping overrides the hold), then its stub exits.
                await asyncio.wait(in_flight, timeout=IN_FLIGHT_TIMEOUT_S + 5)
            probes = []
            while time.monotonic() - killed_at < RECOVERY_LIMIT_S:
                ready = await client.is_ready()
                outcome, _ = await timed_outcome(client, PROBE)
                probes.append((ready, outcome))
                if outcome == "answered" and ready:
                    break
                await asyncio.sleep(0.5)
            return await asyncio.gather(*in_flight), probes

    outcomes, probes = asyncio.run(scenario())

    assert max(seconds for _, seconds in outcomes) < IN_FLIGHT_TIMEOUT_S + 5  # none waited past its deadline
    errors = [outcome for outcome, _ in outcomes if outcome != "answered"]
    assert len(errors) == len(PATENTS)  # all were in flight: none could be answered
    assert all(isinstance(error, (EngineFailure, ServerUnavailable, DeadlineExceeded)) for error in errors), errors
    assert any(not ready for ready, _ in probes), "the model never turned not-ready"
    assert probes[-1] == (True, "answered"), f"the model did not come back within {RECOVERY_LIMIT_S:.0f} s: {probes[-3:]}"
    [recovery] = [r for r in vllm_server.watchdog.recoveries if r.dead_stub_pid == stub.pid]
    assert recovery.ready
    with PatentClassifier(vllm_server.grpc_url, model=VLLM_GEMMA2_MODEL) as client:
        answer = client.classify(PROBE, top_k=len(reference.labels))
    reference.assert_matches(PROBE.render(), served_probabilities(answer, reference.labels))
