"""The vLLM engine when something around it fails: a cancellation probe that raises, scores that
are not finite, an engine core that hangs, overload refused before tokenizing, and vLLM's
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

from patent_classifier_client import AsyncPatentClassifier, PatentClassifier
from patent_classifier_client.errors import DeadlineExceeded, EngineFailure, Overloaded, ServerUnavailable
from core.hf_classifier import EncodedText
from core.serving_config import ServingConfig
from core.synthetic_patents import synthetic_patents
from server.model_watchdog import process_tree, stub_processes
from tests.conftest import MAX_LENGTH, VLLM_GEMMA2_MODEL, held_engines
from tests.test_faults import timed_outcome, until_answered_again
from tests.test_monitoring import scrape, value
from tests.test_serving import served_probabilities
from tests.waiting import until, wait_until

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


class FakeAsyncLLM(AnsweringAsyncLLM):
    """Every request's logits are ``logits``; with ``outputs`` unset, no request ever gets its output
    (an engine core that hangs)."""

    def __init__(self, logits, outputs: threading.Event | None = None):
        self.logits, self.outputs, self.requests = torch.tensor(logits), outputs, []

    async def encode(self, prompt, pooling_params, request_id):
        self.requests.append(request_id)
        while self.outputs is not None and not self.outputs.is_set():
            await asyncio.sleep(0.01)
        yield SimpleNamespace(error=None, outputs=SimpleNamespace(data=self.logits))


class CountingEncoder:
    """The documents' tokens without a tokenizer: each text's length in characters, counted."""

    def __init__(self):
        self.calls = []

    def encode(self, texts):
        self.calls.append(len(texts))
        return [EncodedText(list(range(min(len(text), MAX_LENGTH))), len(text) > MAX_LENGTH) for text in texts]


@contextlib.contextmanager
def engine_on(async_llm, **serving):
    """A VllmEngine around ``async_llm``, its loop running, with a stand-in encoder."""
    from server.vllm_engine import VllmEngine

    engine = VllmEngine(ServingConfig(engine="vllm", model_dir=Path("unused"), max_length=MAX_LENGTH, **serving))
    engine._engine, engine._encoder, engine.dtype = async_llm, CountingEncoder(), "float16"  # what start() sets
    engine._loop_thread = threading.Thread(target=engine._loop.run_forever, daemon=True)
    engine._loop_thread.start()
    try:
        yield engine
    finally:
        engine._shut_down()


def test_scores_that_are_not_finite_fail_their_request_and_are_never_an_answer():
    with engine_on(FakeAsyncLLM([float("inf"), 1.5, 0.0])) as engine:
        with pytest.raises(EngineFailure, match="not finite"):
            engine.submit(["an overflow in float16"]).result(timeout=10)
        assert engine.is_healthy() and engine.queue_depth() == (0, 0)


def test_vllm_holding_work_without_an_output_past_the_bound_is_a_dead_engine():
    """vLLM never answers (its engine core hangs, not dies): past max_forward_pass_s the engine is
    unhealthy for good, whatever the machine's speed (the fake never answers until released)."""
    outputs = threading.Event()
    with engine_on(FakeAsyncLLM([0.5, 1.5, 0.0], outputs), max_forward_pass_s=0.5) as engine:
        assert engine.is_healthy()
        held = engine.submit(["a document vLLM never answers"])
        wait_until(lambda: engine._engine.requests, "the document handed to vLLM")
        wait_until(lambda: not engine.is_healthy(), "health false while vLLM holds work without output")
        outputs.set()
        held.result(timeout=10)
        assert not engine.is_healthy()


def test_a_full_vllm_queue_refuses_before_tokenizing():
    with engine_on(FakeAsyncLLM([0.5, 1.5, 0.0], threading.Event()), max_queue_tokens=2 * MAX_LENGTH) as engine:
        held = [engine.submit(["x" * MAX_LENGTH]) for _ in range(2)]
        assert engine.queue_depth() == (2, 2 * MAX_LENGTH) and engine._encoder.calls == [1, 1]
        with pytest.raises(Overloaded, match=f"max_queue_tokens={2 * MAX_LENGTH}"):
            engine.submit(["청구항 " * 60_000]).result(timeout=0)
        assert engine._encoder.calls == [1, 1]  # refused without tokenizing
        engine._engine.outputs.set()
        assert all(len(future.result(timeout=10)) == 1 for future in held)
        # A short document is counted at max_length until it is tokenized, then at its real count.
        (scores,) = engine.submit(["short"]).result(timeout=10)
        assert scores.token_count == 5 and engine.queue_depth() == (0, 0)


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
            probes = await until_answered_again(client, PROBE, killed_at, RECOVERY_LIMIT_S)
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
